"""NTK's exact path on a Hugging Face Llama with and without an attention mask: one vmapped pass over the probe
against one sample at a time (vmap cannot run Hugging Face's mask construction, so a batch with a mask, even all
ones, takes :mod:`lightning_align.measure.ntk.unbatched`).

Run by hand (one thread on a shared CPU)::

    OMP_NUM_THREADS=1 python benchmarks/ntk_masks.py [--tokens 32] [--probe 8]
"""

from __future__ import annotations

import argparse
import time

import torch

from example_modules.hf import HFCausalLM
from lightning_align.measure.ntk import ntk_spectrum
from lightning_align.measure.probe import ProbeOutputs
from lightning_align.measure.sequence import SequenceReduced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--probe", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    module = HFCausalLM(model_type="llama", width=64, depth=2, heads=4, block_size=args.tokens).eval()
    ids = torch.randint(0, 256, (args.probe, args.tokens))
    padded = torch.ones_like(ids)
    padded[: args.probe // 2, args.tokens // 2 :] = 0
    for label, mask in (("no mask (vmapped)", None), ("mask of ones", torch.ones_like(ids)), ("padded", padded)):
        batch = {"input_ids": ids} if mask is None else {"input_ids": ids, "attention_mask": mask}
        model = SequenceReduced(ProbeOutputs(module), "mean", None if mask is None else "attention_mask")
        start = time.perf_counter()
        res = ntk_spectrum(model, batch, 4, solver="exact", return_vectors=False)
        print(f"{label:20s} {res.vectors.shape[0]} rows  {time.perf_counter() - start:6.2f} s  max_eig {float(res.values[0]):.6g}")


if __name__ == "__main__":
    main()
