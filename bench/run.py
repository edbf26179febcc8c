"""The on-device benchmark, from a checkout: the same as `ember bench` (ember.bench.run).

python bench/run.py [--model smollm2-135m] [--threads 1,2] [--tests pp128,pp512,tg128,k8]
                    [--reps 3] [--quick] [--peer] [--json] [--out DIR]
"""

import sys

from ember.bench.run import main

if __name__ == "__main__":
    sys.exit(main())
