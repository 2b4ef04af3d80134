"""User-facing errors. Each message names the file or key at fault and says what to do."""


class VisionpocError(Exception):
    """An error the user can fix; the CLI prints its message without a traceback."""


class ConfigError(VisionpocError):
    """A bad config file, key, type or override."""


class DataError(VisionpocError):
    """A missing, truncated or undecodable dataset file."""


class ImageError(DataError):
    """One image file that cannot be used: corrupt, not an image, too many pixels, absent."""


class WeightsError(VisionpocError):
    """Pretrained weights that cannot be found or loaded."""


class CheckpointError(VisionpocError):
    """A checkpoint that is missing, truncated or belongs to another model."""


class TrainingInterrupted(VisionpocError):
    """Ctrl-C or SIGTERM: a checkpoint was written at a step boundary; the message says how to resume."""


class RankLost(TrainingInterrupted):
    """Another process of the run (under torchrun) died or lost its host: this one stops too, naming it;
    the last checkpoint stands and the message says how to resume."""


def user_message(e: Exception) -> str:
    """The user's message, also when a DataLoader worker wrapped it in its own traceback text."""
    msg = str(e).strip()
    if msg.startswith("Caught "):
        last = msg.splitlines()[-1]
        msg = last.split(": ", 1)[1] if ": " in last else last
    return msg
