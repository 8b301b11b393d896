import sys

from vllm_moemix.cli import main

sys.exit(main())
