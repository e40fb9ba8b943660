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
