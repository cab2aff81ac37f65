"""Convert pytorch-fid's FID Inception weights (.pth) into the safetensors file `--fid-weights` expects.

brainvq never downloads anything. Get the weights yourself, once, from pytorch-fid's GitHub release:

    https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth

(the Inception-v3 graph of TensorFlow's FID, 2015-12-05, ported by pytorch-fid; 6726825d starts the file's sha256).
Then:

    python scripts/convert_fid_weights.py pt_inception-2015-12-05-6726825d.pth fid_inception.safetensors
    brainvq evaluate-samples RUN --fid-weights fid_inception.safetensors

The .pth is a pickle. It is read with torch.load(..., weights_only=True), which rebuilds only tensors and plain
containers and refuses anything else, so the file cannot run code. Every tensor is checked against brainvq's
network (names, shapes, dtypes, finite values) before the safetensors file is written.
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from brainvq.checkpoint import load_module_state
from brainvq.errors import CheckpointError
from brainvq.metrics.inception import FIDInceptionV3

PUBLISHED_SHA256_PREFIX = "6726825d"


def convert(source: Path, target: Path) -> None:
    """Read the state dict in `source` (.pth) safely, check it against FIDInceptionV3 and save it to `target`."""
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot be read as a weights-only state dict ({message})", source) from None
    if not isinstance(state, dict) or not all(isinstance(tensor, torch.Tensor) for tensor in state.values()):
        raise CheckpointError("holds no state dict of tensors", source)
    network = FIDInceptionV3()
    for name, buffer in network.state_dict().items():
        # A state dict without batch-norm step counters (older torch, or built by hand) gets them as zeros, as
        # torch's own loader does; they play no part in inference.
        if name.endswith("num_batches_tracked"):
            state.setdefault(name, torch.zeros_like(buffer))
    load_module_state(network, state, source=source)
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(target))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
    parser.add_argument("target", type=Path, help="safetensors file to write")
    args = parser.parse_args(argv)
    try:
        convert(args.source, args.target)
    except CheckpointError as error:
        print(f"convert_fid_weights: error: {error}", file=sys.stderr)
        return 1
    digest = hashlib.sha256(args.source.read_bytes()).hexdigest()
    if not digest.startswith(PUBLISHED_SHA256_PREFIX):
        print(f"warning: {args.source} has sha256 {digest}, not pytorch-fid's published file "
              f"({PUBLISHED_SHA256_PREFIX}...): its FID is not comparable with published values", file=sys.stderr)
    print(f"wrote {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
