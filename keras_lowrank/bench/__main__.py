"""`python -m keras_lowrank.bench`: see `keras_lowrank.bench`."""

import sys

from keras_lowrank.bench import main

sys.exit(main())
