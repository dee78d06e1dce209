"""One exception family for everything a user can cause; the CLI catches only these."""


class SafemergeError(Exception):
    """A problem with the user's input or environment, reported as one line."""


class ConfigError(SafemergeError):
    """Bad options: unknown method, λ out of range, conflicting flags, bad output path."""


class CheckpointError(SafemergeError):
    """A model or adapter that cannot be read: missing, corrupt, unsupported or unsafe."""


class IncompatibleModelsError(SafemergeError):
    """Inputs that cannot be merged together: other architecture, tensors or shapes."""


def hub_errors() -> tuple[type[BaseException], ...]:
    """What reading from the Hub raises for a repository that is missing, gated, renamed, offline or
    unreachable (huggingface_hub's errors are OSError or ValueError; transport errors are httpx's)."""
    errors: list[type[BaseException]] = [OSError, ValueError]
    try:
        import httpx

        errors.append(httpx.HTTPError)
    except ImportError:
        pass
    try:
        from datasets.exceptions import DatasetsError

        errors.append(DatasetsError)
    except ImportError:
        pass
    return tuple(errors)
