import sys

from bench.gpu_report.run import main

sys.exit(main())
