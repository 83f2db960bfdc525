"""Pseudonyms: keyed hashes of DICOM identifiers."""
from __future__ import annotations

import hashlib
import hmac


def pseudonym(salt: str, kind: str, value: str, length: int = 16) -> str:
    """Keyed hash (HMAC-SHA256) of an identifier: stable for one salt, not reversible without it.

    Args:
        salt: secret key (keep it to get the same ids on reruns).
        kind: namespace ('patient', 'study', 'series') so equal strings of different kinds differ.
        value: the identifier (UID, PatientID).
        length: hex characters kept.
    """
    if not salt:
        raise ValueError("pseudonym needs a non-empty salt")
    return hmac.new(salt.encode(), f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()[:length]

