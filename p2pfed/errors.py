"""One error family. Every expected failure is a P2PFedError with a one-line
message, a hint, and an exit code that cron users can act on (README: Exit codes)."""
from __future__ import annotations


class P2PFedError(Exception):
    """Base class: message (what is wrong), hint (what to do), exit_code."""

    exit_code = 1
    default_hint = ""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


class UsageError(P2PFedError):
    """Bad command-line arguments or options."""

    exit_code = 2
    default_hint = "see the command's --help"


class SetupError(P2PFedError):
    """Local setup problem: site home, keys, permissions, versions, local state."""

    exit_code = 3
    default_hint = "fix the local setup, then run the command again"


class DatasetError(P2PFedError):
    """The site's nnU-Net dataset is missing, broken or incompatible."""

    exit_code = 4
    default_hint = "fix the dataset under nnUNet_raw, then run the tick again"


class StorageError(P2PFedError):
    """Shared storage unreachable, misconfigured or not supporting create-only writes."""

    exit_code = 5
    default_hint = "check the storage URL, credentials and network; a tick run by cron retries by itself"


class IntegrityError(P2PFedError):
    """A stored object failed verification: tampered, foreign, replayed or not for us."""

    exit_code = 6
    default_hint = "someone changed the shared storage; run `p2pfed verify` and alert the members"


class ContributionRejected(IntegrityError):
    """A member's contribution is well-signed but unusable (non-finite, wrong shape or dtype...)."""

    default_hint = "the named site must fix its node; its contribution is not merged"


class AuthorCheated(IntegrityError):
    """A validly signed envelope whose wrapped key for this site does not unwrap to the key
    its signed header commits to: its author did it (the storage cannot change a signed
    header). A tick turns it into a complaint and a FederationHalted (p2pfed.protocol.complaints)."""

    exit_code = 7
    default_hint = "a person must decide whether the author cheated; the federation halts at every site"

    def __init__(self, author: str, recipient: str, key: str):
        super().__init__(f"{key}: signed by {author}, but the content key it wrapped for {recipient} "
                         "does not open it")
        self.author, self.recipient, self.key = author, recipient, key


class FederationHalted(P2PFedError):
    """Members disagree (plan or merge hashes differ): a person must look."""

    exit_code = 7
    default_hint = "compare versions and settings of the named sites; see `p2pfed status`"
