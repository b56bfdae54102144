"""The export tool's entry point: the same as ``recbole-llm export`` (logic in recbole_llm/export.py).

    python export/export.py --checkpoint saved/BERTLoRA-....pth --output artifacts/bertlora --top-k 10 --triton
"""

import sys

from recbole_llm.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
