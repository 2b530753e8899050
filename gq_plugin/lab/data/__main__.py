import sys

from .photos import fetch_main

sys.exit(fetch_main())
