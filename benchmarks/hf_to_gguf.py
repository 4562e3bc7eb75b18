"""Write a float32 GGUF from a Hugging Face folder (llama or qwen2): exporters.hf_gguf's writer on the command line.

    python benchmarks/hf_to_gguf.py HF_FOLDER OUT.gguf
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from exporters.hf_gguf import write_gguf  # noqa: E402  (tests and scale_models.py import it from here too)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    print(write_gguf(args.folder, args.out))


if __name__ == "__main__":
    sys.exit(main())
