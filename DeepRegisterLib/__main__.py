"""``python -m DeepRegisterLib`` runs the ``deepregister`` command line."""

from .cli.main import run

run()
