"""ProtoMask training on cached shards: streaming, model, losses, push, Ray Train loop, evaluation."""


class TrainError(RuntimeError):
    """Training or evaluation could not run; the message says why."""
