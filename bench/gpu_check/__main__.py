import sys

from bench.gpu_check.runner import main

sys.exit(main())
