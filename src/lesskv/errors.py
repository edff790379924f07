"""The one exception type users see: the CLI prints its message on one line and exits 2."""


class LessKVError(ValueError):
    """Bad input (budget, model, data, checkpoint...) explained in one readable sentence."""
