"""keys.crypto: AES-256-GCM sealing, the stored format, AAD binding and fail-closed opening (security.md §9,
tests 1, 3, 6 and 7). Pure: no database."""

from __future__ import annotations

import base64
import pickle
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keys import crypto
from keys.crypto import (
    DecryptionError,
    Keyring,
    Secret,
    canonical_aad,
    needs_rewrap,
    open_bytes,
    open_sealed,
    provider_key_aad,
    provider_key_aad_v1,
    reseal,
    seal,
    seal_bytes,
    stored_kid,
)
from tests.keys.conftest import make_ring

ORG = uuid.UUID("0b9f0a52-8c1e-4a57-9a39-3b1f6a8d2c11")
OTHER_ORG = uuid.UUID("7d2c4e10-55b1-4f0e-8f43-2a9c1b7e6d90")
KEY = uuid.UUID("c3a1e6f2-1d4b-4c8e-b5a7-9e0f2d3c4b5a")
OTHER_KEY = uuid.UUID("e8b7a6c5-d4e3-4f21-8a9b-0c1d2e3f4a5b")
DEST = "https://api.openai.com/v1"
AAD = provider_key_aad(org_id=ORG, key_id=KEY, provider="openai", destination=DEST)


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --- Format ---------------------------------------------------------------------------------------------------


def test_sealed_value_has_version_kid_12_byte_nonce_and_16_byte_tag():
    ring = make_ring(3, 1)
    stored = seal(ring, "sk-proj-abc", AAD)
    version, kid, nonce, body = stored.split(".")
    assert (version, kid) == ("cf1", "3")
    assert len(_b64url_decode(nonce)) == 12
    # AES-GCM ciphertext is as long as the plaintext; the rest is the 16-byte tag.
    assert len(_b64url_decode(body)) == len(b"sk-proj-abc") + 16
    assert "=" not in stored


def test_plaintext_does_not_appear_in_the_sealed_value():
    secret = "sk-proj-" + "x" * 40
    stored = seal(make_ring(1), secret, AAD)
    assert secret not in stored
    assert "x" * 8 not in stored


def test_known_answer_aes_256_gcm_vector_opens_through_the_stored_format():
    """McGrew & Viega, "The Galois/Counter Mode of Operation", test case 16 (AES-256, 96-bit IV, with AAD)."""
    key = bytes.fromhex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
    iv = bytes.fromhex("cafebabefacedbaddecaf888")
    aad = bytes.fromhex("feedfacedeadbeeffeedfacedeadbeefabaddad2")
    plaintext = bytes.fromhex(
        "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
        "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39"
    )
    ciphertext = bytes.fromhex(
        "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
        "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662"
    )
    tag = bytes.fromhex("76fc6ece0f4e1768cddf8853bb2d551b")
    ring = Keyring.parse(f"7:{base64.b64encode(key).decode()}")

    def b64url(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    stored = f"cf1.7.{b64url(iv)}.{b64url(ciphertext + tag)}"
    assert open_bytes(ring, stored, aad) == plaintext
    with pytest.raises(DecryptionError):
        open_bytes(ring, stored, aad[:-1])


def test_canonical_aad_encoding_is_pinned():
    """Changing this encoding would make every stored key unreadable: it must never change silently."""
    assert canonical_aad("ab", "c") != canonical_aad("a", "bc")
    assert canonical_aad("ab", "c") == bytes.fromhex("000000020000000261620000000163")
    v1 = (
        b"\x00\x00\x00\x04"
        + b"\x00\x00\x00\x18cesaflow/provider-key/v1"
        + b"\x00\x00\x00\x24"
        + str(ORG).encode()
        + b"\x00\x00\x00\x24"
        + str(KEY).encode()
        + b"\x00\x00\x00\x06openai"
    )
    # Version 1 is what every key sealed before the destination joined the AAD was bound to: the re-seal needs it.
    assert provider_key_aad_v1(org_id=ORG, key_id=KEY, provider="openai") == v1
    v2 = (
        b"\x00\x00\x00\x05"
        + b"\x00\x00\x00\x18cesaflow/provider-key/v2"
        + b"\x00\x00\x00\x24"
        + str(ORG).encode()
        + b"\x00\x00\x00\x24"
        + str(KEY).encode()
        + b"\x00\x00\x00\x06openai"
        + b"\x00\x00\x00\x19https://api.openai.com/v1"
    )
    assert v2 == AAD
    # UUIDs are canonicalised, so an uppercase or hyphen-less id names the same row.
    assert provider_key_aad(org_id=str(ORG).upper(), key_id=KEY.hex, provider="openai", destination=DEST) == AAD


# --- Round trip and tamper (property tests) ----------------------------------------------------------------

_aad_fields = st.tuples(
    st.uuids(), st.uuids(), st.sampled_from(["openai", "anthropic", "groq", "openai_compatible"]), st.text(max_size=80)
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plaintext=st.binary(max_size=4096), fields=_aad_fields)
def test_seal_then_open_round_trips(plaintext, fields):
    ring = make_ring(2, 1)
    aad = provider_key_aad(org_id=fields[0], key_id=fields[1], provider=fields[2], destination=fields[3])
    assert open_bytes(ring, seal_bytes(ring, plaintext, aad), aad) == plaintext


@settings(max_examples=500, deadline=None)
@given(text=st.text(max_size=512))
def test_text_secrets_round_trip(text):
    ring = make_ring(1)
    assert open_sealed(ring, seal(ring, text, AAD), AAD) == text


@settings(max_examples=500, deadline=None)
@given(plaintext=st.binary(min_size=0, max_size=256), data=st.data())
def test_any_single_flipped_bit_fails_with_the_generic_error(plaintext, data):
    ring = make_ring(1, 2)
    stored = seal_bytes(ring, plaintext, AAD)
    position = data.draw(st.integers(0, len(stored) - 1))
    bit = data.draw(st.integers(0, 6))  # stay within ASCII: the column is text
    tampered = stored[:position] + chr(ord(stored[position]) ^ (1 << bit)) + stored[position + 1 :]
    with pytest.raises(DecryptionError) as info:
        open_bytes(ring, tampered, AAD)
    assert str(info.value) == DecryptionError.MESSAGE


def test_every_single_byte_flip_of_a_sealed_value_fails():
    """Exhaustive over one value: every position, every low-7 bit, header, nonce, ciphertext and tag alike."""
    ring = make_ring(1, 2)
    stored = seal(ring, "sk-ant-api03-" + "k" * 30, AAD)
    for position in range(len(stored)):
        for bit in range(7):
            tampered = stored[:position] + chr(ord(stored[position]) ^ (1 << bit)) + stored[position + 1 :]
            with pytest.raises(DecryptionError):
                open_sealed(ring, tampered, AAD)


def test_truncated_or_extended_values_fail():
    ring = make_ring(1)
    stored = seal(ring, "sk-proj-truncate-me", AAD)
    for cut in range(len(stored)):
        with pytest.raises(DecryptionError):
            open_sealed(ring, stored[:cut], AAD)
    for suffix in ("A", "AA", "AAAA", ".", ".x", "\n", " "):
        with pytest.raises(DecryptionError):
            open_sealed(ring, stored + suffix, AAD)


def test_non_canonical_base64_is_refused():
    """The last character of unpadded base64 carries unused bits; a value that differs only there must fail,
    or a tampered stored value would open."""
    ring = make_ring(1)
    stored = seal(ring, "x" * 6, AAD)  # 6 + 16 = 22 bytes -> 30 characters; the last one carries 4 unused bits
    prefix, last = stored[:-1], stored[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    index = alphabet.index(last)
    siblings = [alphabet[(index & ~0b1111) | low] for low in range(16) if (index & ~0b1111) | low != index]
    for sibling in siblings:
        with pytest.raises(DecryptionError):
            open_sealed(ring, prefix + sibling, AAD)


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "sk-proj-" + "plaintext-legacy-value",
        "cf1",
        "cf1.1",
        "cf1.1..",
        "cf1.1.AAAAAAAAAAAAAAAA.",
        "cf2.1.AAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAA",
        "cf1.01.AAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAA",
        "cf1.-1.AAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAA",
        "cf1.1.AAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAA",
        "cf1.1.AAAA.AAAAAAAAAAAAAAAAAAAAAA",
        "cf1.1.AAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAA==",
        "cf1.1.AAAAAAAAAAAAAAAA+AAAAAAAAAAAAAAAAAAAAAA",
        "cf1.1.AAAAAAAAAAAAAAAA.AAAA AAAAAAAAAAAAAAAAAA",
        "cf1.1.AAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAA.extra",
        "cf1.1.ÀAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAA",
        "cf1.99.AAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAA",
        "cf1.1." + "A" * 20000,
    ],
)
def test_garbage_fails_closed_and_is_never_returned(stored):
    ring = make_ring(1)
    with pytest.raises(DecryptionError) as info:
        open_sealed(ring, stored, AAD)
    assert str(info.value) == DecryptionError.MESSAGE
    assert not info.value.retired_kid


def test_ciphertext_moved_to_another_org_key_provider_or_destination_does_not_open():
    ring = make_ring(1)
    stored = seal(ring, "sk-proj-bound-to-its-row", AAD)
    for other in (
        provider_key_aad(org_id=OTHER_ORG, key_id=KEY, provider="openai", destination=DEST),
        provider_key_aad(org_id=ORG, key_id=OTHER_KEY, provider="openai", destination=DEST),
        provider_key_aad(org_id=ORG, key_id=KEY, provider="groq", destination=DEST),
        provider_key_aad(org_id=ORG, key_id=KEY, provider="openai", destination="https://attacker.example/v1"),
        provider_key_aad_v1(org_id=ORG, key_id=KEY, provider="openai"),
        b"",
    ):
        with pytest.raises(DecryptionError):
            open_sealed(ring, stored, other)
    assert open_sealed(ring, stored, AAD) == "sk-proj-bound-to-its-row"


def test_unknown_kid_fails_closed():
    stored = seal(make_ring(2), "sk-proj-x", AAD)
    with pytest.raises(DecryptionError) as info:
        open_sealed(make_ring(1), stored, AAD)
    assert not info.value.retired_kid


def test_same_kid_with_different_key_material_fails():
    stored = seal(make_ring(1), "sk-proj-x", AAD)
    impostor = Keyring.parse(f"1:{crypto.generate_key()}")
    with pytest.raises(DecryptionError):
        open_sealed(impostor, stored, AAD)


def test_kid_below_min_kid_fails_closed_and_says_retired():
    stored = seal(make_ring(1), "sk-proj-x", AAD)
    with pytest.raises(DecryptionError) as info:
        open_sealed(make_ring(2, 1, min_kid=2), stored, AAD)
    assert info.value.retired_kid
    assert str(info.value) == DecryptionError.MESSAGE  # the same words as any other failure


# --- Nonces -----------------------------------------------------------------------------------------------------


def test_nonces_are_unique_over_10000_seals_of_the_same_plaintext():
    ring = make_ring(1)
    values = [seal(ring, "sk-proj-same-plaintext", AAD) for _ in range(10_000)]
    nonces = [v.split(".")[2] for v in values]
    assert all(len(_b64url_decode(n)) == 12 for n in nonces)
    assert len(set(nonces)) == 10_000
    assert len(set(values)) == 10_000  # no determinism (contrast: a fixed IV)


# --- Rotation helpers ---------------------------------------------------------------------------------------


def test_needs_rewrap_and_reseal_move_a_value_to_the_primary_kid():
    old = seal(make_ring(1), "sk-proj-rotate", AAD)
    ring = make_ring(2, 1)
    assert stored_kid(old) == 1
    assert needs_rewrap(ring, old)
    new = reseal(ring, old, AAD)
    assert stored_kid(new) == 2
    assert not needs_rewrap(ring, new)
    assert open_sealed(make_ring(2), new, AAD) == "sk-proj-rotate"


def test_reseal_keeps_the_binding():
    old = seal(make_ring(1), "sk-proj-rotate", AAD)
    with pytest.raises(DecryptionError):
        reseal(
            make_ring(2, 1), old, provider_key_aad(org_id=OTHER_ORG, key_id=KEY, provider="openai", destination=DEST)
        )


def test_reseal_can_move_a_value_to_new_associated_data():
    v1 = provider_key_aad_v1(org_id=ORG, key_id=KEY, provider="openai")
    old = seal(make_ring(1), "sk-proj-upgrade", v1)
    ring = make_ring(2, 1)
    new = reseal(ring, old, v1, new_aad=AAD)
    assert stored_kid(new) == 2
    assert open_sealed(ring, new, AAD) == "sk-proj-upgrade"
    with pytest.raises(DecryptionError):
        open_sealed(ring, new, v1)
    with pytest.raises(DecryptionError):  # the old binding is checked on the way: a moved value does not open
        reseal(ring, old, provider_key_aad_v1(org_id=OTHER_ORG, key_id=KEY, provider="openai"), new_aad=AAD)


# --- Keyring and Secret -------------------------------------------------------------------------------------


def test_keyring_repr_shows_kids_and_never_key_material():
    ring = make_ring(2, 1, min_kid=1)
    text = repr(ring) + str(ring)
    assert "kids=[1, 2]" in text
    for material in ring.keys.values():
        assert base64.b64encode(material).decode() not in text
        assert material.hex() not in text


def test_secret_never_shows_its_value():
    secret = Secret("sk-proj-hidden-value-1234")
    shown_forms = (repr(secret), str(secret), f"{secret}", f"{secret!r}", f"{secret:>40}", repr([secret]))
    for shown in shown_forms:
        assert "hidden" not in shown
        assert "1234" not in shown
    assert secret.reveal() == "sk-proj-hidden-value-1234"


def test_secret_refuses_pickling_and_is_gone_after_drop():
    secret = Secret("sk-proj-hidden-value-1234")
    with pytest.raises(TypeError):
        pickle.dumps(secret)
    secret.drop()
    assert secret.dropped
    with pytest.raises(RuntimeError):
        secret.reveal()


def test_seal_accepts_a_secret_wrapper():
    ring = make_ring(1)
    assert open_sealed(ring, seal(ring, Secret("sk-proj-wrapped"), AAD), AAD) == "sk-proj-wrapped"


def test_invalid_utf8_plaintext_fails_text_opening():
    ring = make_ring(1)
    stored = seal_bytes(ring, b"\xff\xfe", AAD)
    with pytest.raises(DecryptionError):
        open_sealed(ring, stored, AAD)


def test_can_open_respects_min_kid():
    ring = make_ring(3, 2, 1, min_kid=2)
    assert ring.can_open(3)
    assert ring.can_open(2)
    assert not ring.can_open(1)
    assert not ring.can_open(4)
