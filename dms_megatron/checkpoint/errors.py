"""The one error of the checkpoint package."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial, corrupt or does not match the model."""


__all__ = ["CheckpointError"]
