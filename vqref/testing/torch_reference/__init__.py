"""torch autograd references for every manual backward in vqref, in float64.

Each reference is written the way an autograd user would write the forward, with ``.detach()``
exactly where the math has a stop-gradient ``sg[.]``, and returns the gradients that autograd
computes for a given upstream gradient.  Inputs and outputs are numpy arrays (or anything
``vqref.backend.to_numpy`` accepts); torch is imported inside the functions only, so importing
this package does not need torch.
"""
