"""`python -m brainvq` (and so `torchrun -m brainvq ...`)."""

from brainvq.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
