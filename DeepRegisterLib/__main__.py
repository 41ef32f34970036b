"""``python -m DeepRegisterLib`` runs the ``deepregister`` command line."""

import sys

from .cli import main

sys.exit(main())
