"""Download errors: each reaches the user as one line (see `llama4_quant.cli.common.handle_errors`)."""

from __future__ import annotations

from ..errors import Llama4QuantError


class HubError(Llama4QuantError):
    """Something went wrong talking to the Hub or storing what it sent."""


class GatedRepoAccessError(HubError):
    """The repo is gated and the token (if any) has not been granted access."""


class RepoNotFoundError(HubError):
    """No such repo, revision or file (or it is private and the token cannot see it)."""


class HashMismatchError(HubError):
    """A downloaded file does not match the hash the Hub advertises; the file has been deleted."""


class DiskSpaceError(HubError):
    """Not enough free space for the files still to download."""


class HubNetworkError(HubError):
    """The Hub could not be reached, or a transfer failed; finished files are kept for the next run."""


def http_status(exc: BaseException) -> int | None:
    return getattr(getattr(exc, "response", None), "status_code", None)


def classify(exc: BaseException) -> str | None:
    """What a huggingface_hub / network exception means, in one word (the one place that knows the exception
    types; model downloads and calibration datasets word their own messages from it):

    gated, revision, entry (no such file), disabled, repo (no such repo / private), invalid (not a repo id),
    offline (HF_HUB_OFFLINE), http (any other HTTP status), network (unreachable, transfer failed,
    LocalEntryNotFoundError), disk (ENOSPC); None when `exc` is none of these."""
    import errno

    from huggingface_hub import errors as E

    for kind, types in (("network", (E.LocalEntryNotFoundError,)),  # before "entry": it is an EntryNotFoundError
                        ("gated", (E.GatedRepoError,)), ("revision", (E.RevisionNotFoundError,)),
                        ("entry", (E.RemoteEntryNotFoundError, E.EntryNotFoundError)),
                        ("disabled", (E.DisabledRepoError,)), ("repo", (E.RepositoryNotFoundError,)),
                        ("invalid", (E.HFValidationError,)), ("http", (E.HfHubHTTPError,)),
                        ("offline", (E.OfflineModeIsEnabled,))):
        if isinstance(exc, types):
            return kind
    if _is_transport_error(exc):
        return "network"
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return "disk"
    return None


def _is_transport_error(exc: BaseException) -> bool:
    for modname in ("httpx2", "httpx"):  # huggingface_hub 2.x ships httpx2
        try:
            mod = __import__(modname)
        except ImportError:
            continue
        if isinstance(exc, getattr(mod, "TransportError", ())):
            return True
    return isinstance(exc, (ConnectionError, TimeoutError))
