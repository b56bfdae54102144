import sys

from recbole_llm.cli import main

sys.exit(main())
