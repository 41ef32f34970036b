"""``python -m DeepRegisterLib`` runs the ``deepregister`` command line."""

import sys

from .cli.main import main

sys.exit(main())
