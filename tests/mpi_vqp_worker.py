"""vector-quantize-pytorch under torch.distributed next to vqref under MPI, on the same 2 ranks.

``mpiexec -n 2 python tests/mpi_vqp_worker.py``: mpiexec starts the processes, mpi4py gives each
its rank, and torch.distributed joins them in a gloo group on the loopback interface.  Rank 0
prints one JSON object of measurements for tests/test_distributed.py:

* ``ema``: one training step of vqp's ``VectorQuantize(sync_codebook=True)`` with 3 rows on rank 0
  and 10 on rank 1, against vqp on the whole batch in one process, and against vqref's
  ``training_update`` through ``MPIComm`` from the same codebook and the same codes;
* ``kmeans``: vqp's k-means initialisation with ``sync_kmeans=True``: whether the ranks agree, and
  whether they agree with vqp's own single-process initialisation under the same torch seed;
* ``sampling``: how many distinct rows vqp's ``sample_vectors_distributed`` returns when asked
  for 7 of 13 rows (3 + 10) over many draws, and the same for vqref's global draw.

Symbols: K codes, D features.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # vqref from this checkout

from vqref.core.ema import EMAState  # noqa: E402
from vqref.core.kmeans import sample_initial_means  # noqa: E402
from vqref.core.state import training_update  # noqa: E402
from vqref.distributed import MPIComm  # noqa: E402

K, D, SIZES = 7, 5, (3, 10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    comm = MPIComm()
    port = comm.broadcast(free_port() if comm.rank == 0 else None)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))

    import torch
    import torch.distributed as dist
    from vector_quantize_pytorch import VectorQuantize
    from vector_quantize_pytorch.vector_quantize_pytorch import sample_vectors_distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=comm.rank, world_size=comm.size)
    bounds = np.concatenate([[0], np.cumsum(SIZES)])
    x = np.random.default_rng(0).standard_normal((bounds[-1], D)).astype(np.float32)
    mine = x[bounds[comm.rank] : bounds[comm.rank + 1]]
    out = {}

    # one EMA step: vqp with DDP, vqp alone on the whole batch, vqref through MPI
    def vq(sync):
        torch.manual_seed(1)
        return VectorQuantize(dim=D, codebook_size=K, decay=0.8, sync_codebook=sync, rotation_trick=False).train()

    ddp, alone = vq(True), vq(False)
    start = ddp._codebook.embed[0].detach().numpy().copy()  # (K, D)
    _, idx, _ = ddp(torch.from_numpy(mine)[None])
    alone(torch.from_numpy(x)[None])
    state = EMAState(start, np.ones(K, np.float32), start.copy())  # vqp's start: N_k = 1, m_k = c_k
    ours = training_update(state, mine, idx[0].numpy(), decay=0.8, eps=1e-5, comm=comm)
    theirs = [ddp._codebook.embed[0], ddp._codebook.cluster_size[0], ddp._codebook.embed_avg[0]]
    theirs = [t.detach().numpy() for t in theirs]
    out["ema"] = {
        "vqp_ddp_vs_vqp_alone": float(np.abs(theirs[0] - alone._codebook.embed[0].detach().numpy()).max()),
        "vqref_vs_vqp_ddp": [float(np.abs(a - b).max()) for a, b in zip(ours, theirs)],
    }

    # k-means initialisation with sync_kmeans
    def kmeans_vq(sync, rows):
        torch.manual_seed(2)
        m = VectorQuantize(
            dim=D, codebook_size=K, kmeans_init=True, kmeans_iters=2, sync_codebook=sync, rotation_trick=False
        )
        m.train()(torch.from_numpy(rows)[None])
        return m._codebook.embed[0].detach().numpy()

    codebooks = comm.allgather(kmeans_vq(True, mine))
    alone_codebook = kmeans_vq(False, x)
    out["kmeans"] = {
        "ranks_agree": bool(np.array_equal(codebooks[0], codebooks[1])),
        "equal_to_alone": bool(np.allclose(codebooks[0], alone_codebook, atol=1e-5)),
    }

    # sampling 7 of the 13 global rows
    row_ids = np.arange(bounds[-1], dtype=np.float32)[:, None]  # each row holds its own number
    local_ids = row_ids[bounds[comm.rank] : bounds[comm.rank + 1]]
    torch.manual_seed(3)
    theirs = [
        len(np.unique(sample_vectors_distributed(torch.from_numpy(local_ids)[None], K).numpy())) for _ in range(100)
    ]
    ours = [len(np.unique(sample_initial_means(local_ids, K, np.random.default_rng(s), comm=comm))) for s in range(100)]
    out["sampling"] = {"vqp_distinct": theirs, "vqref_distinct": ours}

    dist.destroy_process_group()
    if comm.rank == 0:
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
