"""The key seals of secure rounds, as the per-tick view reads and checks them
(docs/design.md 7.8): a mixin of `View`, which provides the participants, quorum,
opening times, the storage listing and where verified seals are kept (`kept_seal`, `keep`)."""
from __future__ import annotations

import json

from .. import crypto, layout
from ..errors import IntegrityError

CLOCK_SKEW_S = 600  # a seal's deadline is the sealer's clock; others allow this much skew


class KeySeals:
    def key_seal(self, r: int) -> tuple[str, dict] | None:
        """(sha256, body) of round r's verified key seal: whose key material the round masks
        with, all participants' or, after the deadline, at least secagg.minimum of them.
        Kept in the site home once verified, like a round seal: its check reads every
        key material it lists, which no later tick reads again."""
        if r not in self._key_seals:
            kept = self.kept_seal(f"{r:05d}.keys.json")
            if kept is not None and kept.exists():
                sha, body = json.loads(kept.read_text())
                self._key_seals[r] = (sha, body)
            elif (found := self.resolve(layout.key_seal(r), "keyseal")) is not None:
                self._check_key_seal(r, found[2])
                self._key_seals[r] = (crypto.sha256_hex(found[1]), found[2])
                self.keep(kept, self._key_seals[r])
            else:
                self._key_seals[r] = None
        return self._key_seals[r]

    def forget_key_seal(self, r: int) -> None:
        self._key_seals.pop(r, None)

    def _check_key_seal(self, r: int, body: dict) -> None:
        from .. import secagg

        key, parts, by, keys = layout.key_seal(r), self.participants_of(r), body.get("author"), body["keys"]
        if body["round"] != r or not set(keys) <= set(parts) or body["opened_at"] != self.opened_at(r):
            raise IntegrityError(f"{key}: malformed key seal by {by} (round, sites or opening time)")
        if len(keys) < len(parts) and (body["reason"] != "deadline"
                                       or len(keys) < secagg.minimum(len(parts), self.quorum_of(r))
                                       or body["sealed_at"] + CLOCK_SKEW_S < body["opened_at"] + self.s.deadline_s):
            raise IntegrityError(f"{key}: sealed with the key material of {len(keys)} sites before the deadline "
                                 f"(sealed by {by})")
        for site, sha in keys.items():
            if self.find(layout.secagg_keys(r, site), sha, key) is None:
                raise IntegrityError(f"{layout.secagg_keys(r, site)}: not the key material the key seal lists"
                                     f"{self.junk_at(layout.secagg_keys(r, site))}")

    def _check_secure_seal(self, r: int, body: dict) -> None:
        from .. import secagg

        key, by, contrib, found = layout.seal(r), body.get("author"), body["contributions"], self.key_seal(r)
        if found is None or body.get("keys") != found[0]:
            raise IntegrityError(f"{key}: names key seal {str(body.get('keys'))[:16]}, not the one stored at "
                                 f"{layout.key_seal(r)}{self.junk_at(layout.key_seal(r))} (sealed by {by})")
        if not set(contrib) <= set(found[1]["keys"]):
            raise IntegrityError(f"{key}: lists contributions of sites without sealed key material (sealed by {by})")
        if len(contrib) < secagg.minimum(len(self.participants_of(r)), self.quorum_of(r)):
            raise IntegrityError(f"{key}: sealed with {len(contrib)} contributions, fewer than secure "
                                 f"aggregation needs (sealed by {by})")

