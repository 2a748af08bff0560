"""Security services: Argon2id passwords, the AES-256-GCM keyring, TOTP. No mocks, no services."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import os
import re
import uuid
from urllib.parse import parse_qs, unquote, urlsplit

import hypothesis
import pytest
from hypothesis import strategies as st

from datalayer import ConfigError, DataLayerError, Settings, ValidationError
from datalayer.security import (
    DEFAULT_POLICY,
    DEV_KID,
    MAX_PASSWORD_LENGTH,
    OWASP_MINIMUM,
    DecryptionError,
    Keyring,
    PasswordHasher,
    PasswordPolicy,
    totp,
)
from datalayer.settings import parse_keys

# ---------------------------------------------------------------- passwords

FAST = PasswordPolicy(memory_kib=1024, iterations=1)  # cheap; the default is tested once below
PHC = re.compile(r"\$argon2id\$v=19\$m=(\d+),t=(\d+),p=(\d+)\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)")


@pytest.fixture(scope="module")
def fast() -> PasswordHasher:
    return PasswordHasher(FAST)


@pytest.fixture(scope="module")
def default_hash() -> str:
    return PasswordHasher().hash("correct horse battery staple")


def test_roundtrip_and_wrong_password(fast: PasswordHasher) -> None:
    phc = fast.hash("s3cret pässword")
    assert fast.verify(phc, "s3cret pässword") is True
    assert fast.verify(phc, "s3cret passwörd") is False
    assert fast.verify(phc, "s3cret pässword ") is False


def test_phc_format_and_salt(fast: PasswordHasher) -> None:
    a, b = fast.hash("same"), fast.hash("same")
    ma, mb = PHC.fullmatch(a), PHC.fullmatch(b)
    assert ma is not None and mb is not None
    assert ma.group(1, 2, 3) == ("1024", "1", "1")
    assert len(base64.b64decode(ma.group(4) + "==")) == FAST.salt_len
    assert len(base64.b64decode(ma.group(5) + "=")) == FAST.hash_len
    assert a != b and ma.group(4) != mb.group(4)  # fresh salt each time
    assert fast.verify(a, "same") and fast.verify(b, "same")


def test_default_policy_meets_owasp_floor(default_hash: str) -> None:
    assert DEFAULT_POLICY.memory_kib >= 19456 and DEFAULT_POLICY.iterations >= 2
    assert DEFAULT_POLICY.lanes >= 1 and DEFAULT_POLICY.salt_len >= 16
    assert DEFAULT_POLICY.covers(OWASP_MINIMUM)
    assert not FAST.covers(OWASP_MINIMUM)
    assert default_hash.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    hasher = PasswordHasher()
    assert hasher.verify(default_hash, "correct horse battery staple")
    assert not hasher.verify(default_hash, "correct horse battery stapler")


def test_needs_rehash(fast: PasswordHasher, default_hash: str) -> None:
    current = PasswordHasher()
    assert current.needs_rehash(fast.hash("pw")) is True
    assert current.needs_rehash(default_hash) is False
    assert fast.needs_rehash(default_hash) is False  # stronger than the policy is fine
    for weaker in (dataclasses.replace(FAST, salt_len=8), dataclasses.replace(FAST, hash_len=16)):
        assert fast.needs_rehash(PasswordHasher(weaker).hash("pw")) is True
    assert PasswordHasher(dataclasses.replace(FAST, lanes=2)).needs_rehash(fast.hash("pw"))


B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _malformed(good: str) -> list[str]:
    head, salt, digest = good.rsplit("$", 2)
    return [
        "",
        "not a hash",
        "$2b$12$R9h/cIPz0gi.URNNX3kh2OPST9/PgBkqquzi.Ss7KIUgO2t0jWMUW",  # bcrypt
        good.replace("$argon2id$", "$argon2i$"),
        good.replace("v=19", "v=16"),
        good.replace("m=1024", "m=0"),
        good.replace("m=1024,t=1", "t=1,m=1024"),
        good.replace("m=1024", "m=99999999999"),
        good.replace("t=1", "t=1000"),
        good + "=",
        good + "$extra",
        f"{head}$${digest}",
        f"{head}${salt[:4]}${digest}",  # salt under 8 bytes
        f"{head}${salt}${digest[:-2]}",  # impossible base64 length
        f"{head}${salt}${digest[:-1]}{B64[B64.index(digest[-1]) ^ 1]}",  # stray unused bits
        " " + good,
    ]


def test_malformed_hash_raises_without_leaking(fast: PasswordHasher) -> None:
    good = fast.hash("pw")
    _, salt, digest = good.rsplit("$", 2)
    for bad in _malformed(good):
        with pytest.raises(ValidationError) as verify_info:
            fast.verify(bad, "pw")
        with pytest.raises(ValidationError) as rehash_info:
            fast.needs_rehash(bad)
        for text in (str(verify_info.value), str(rehash_info.value)):
            assert salt[:8] not in text and digest[:8] not in text
            assert not bad or bad not in text


def test_password_bounds(fast: PasswordHasher) -> None:
    for bad in ("", "x" * (MAX_PASSWORD_LENGTH + 1), "lone \ud800 surrogate"):
        with pytest.raises(ValidationError) as info:
            fast.hash(bad)
        assert bad not in str(info.value) or not bad
    longest = "y" * MAX_PASSWORD_LENGTH
    phc = fast.hash(longest)
    assert fast.verify(phc, longest)
    assert fast.verify(phc, "") is False  # refused input is a mismatch, not an error
    assert fast.verify(phc, longest + "y") is False


def test_unicode_is_normalised(fast: PasswordHasher) -> None:
    composed, decomposed = "\u00c5ngstr\u00f6m", "A\u030angstro\u0308m"
    assert composed != decomposed
    assert fast.verify(fast.hash(composed), decomposed)


def test_policy_refuses_unusable_parameters() -> None:
    for kwargs in ({"memory_kib": 7}, {"iterations": 0}, {"lanes": 0}, {"salt_len": 4},
                   {"hash_len": 2}, {"memory_kib": 1 << 30}):
        with pytest.raises(ValidationError):
            PasswordPolicy(**kwargs)


async def test_async_helpers_run_off_the_loop(fast: PasswordHasher) -> None:
    ticks = 0

    async def heartbeat() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1

    beat = asyncio.create_task(heartbeat())
    try:
        phc = await PasswordHasher().hash_async("async pw")
        assert await PasswordHasher().verify_async(phc, "async pw")
        assert not await fast.verify_async(await fast.hash_async("a"), "b")
    finally:
        beat.cancel()
    assert ticks > 0  # the loop kept running while Argon2 worked in a thread


# ---------------------------------------------------------------- keyring

K1, K2 = os.urandom(32), os.urandom(32)
ORG, OTHER_ORG = uuid.uuid4(), uuid.uuid4()
ROW = uuid.uuid4()
PLACE: dict[str, object] = {"org_id": ORG, "table": "credentials", "row_id": ROW,
                            "column": "secret"}
KEYS_IN_TEXT = [k for key in (K1, K2) for k in (base64.b64encode(key).decode(), key.hex())]


def _enc(ring: Keyring, data: bytes, **place: object) -> bytes:
    return ring.encrypt(data, **{**PLACE, **place})  # type: ignore[arg-type]


def _dec(ring: Keyring, blob: bytes, **place: object) -> bytes:
    return ring.decrypt(blob, **{**PLACE, **place})  # type: ignore[arg-type]


def _assert_clean(exc: BaseException, plaintext: bytes = b"") -> None:
    text = str(exc)
    assert all(k not in text for k in KEYS_IN_TEXT)
    if plaintext:
        assert plaintext.decode("latin-1") not in text


def test_keyring_roundtrip_and_layout() -> None:
    ring = Keyring([("k1", K1)])
    blob = _enc(ring, b"api-key-123")
    assert _dec(ring, blob) == b"api-key-123"
    assert blob[0] == 0x01 and blob[1] == 2 and blob[2:4] == b"k1"
    assert len(blob) == 1 + 1 + 2 + 12 + len(b"api-key-123") + 16
    assert Keyring.key_id_of(blob) == "k1" and ring.active_kid == "k1"
    assert _dec(ring, blob, row_id=str(ROW)) == b"api-key-123"  # UUID == its canonical text
    assert _dec(ring, _enc(ring, b"")) == b""
    s = ring.encrypt_str("héllo", **PLACE)  # type: ignore[arg-type]
    assert ring.decrypt_str(s, **PLACE) == "héllo"  # type: ignore[arg-type]


def test_nonces_are_fresh() -> None:
    ring = Keyring([("k1", K1)])
    blobs = {_enc(ring, b"same") for _ in range(50)}
    assert len(blobs) == 50
    assert len({b[4:16] for b in blobs}) == 50


def test_any_tampered_or_truncated_byte_is_refused() -> None:
    ring = Keyring([("k1", K1)])
    secret = b"tampering target"
    blob = _enc(ring, secret)
    for i in range(len(blob)):
        for flip in (0x01, 0x80, 0xFF):
            bad = bytearray(blob)
            bad[i] ^= flip
            with pytest.raises(DecryptionError) as info:
                _dec(ring, bytes(bad))
            _assert_clean(info.value, secret)
    for n in range(len(blob)):
        with pytest.raises(DecryptionError):
            _dec(ring, blob[:n])
    with pytest.raises(DecryptionError):
        _dec(ring, blob + b"\x00")


def test_ciphertext_is_bound_to_its_place() -> None:
    ring = Keyring([("k1", K1)])
    secret = b"moved secret"
    blob = _enc(ring, secret)
    for place in ({"row_id": uuid.uuid4()}, {"row_id": str(ROW).upper()}, {"column": "token"},
                  {"table": "webhooks"}, {"org_id": OTHER_ORG}, {"org_id": None}):
        with pytest.raises(DecryptionError) as info:
            _dec(ring, blob, **place)
        assert "k1" in str(info.value) and "authentication failed" in str(info.value)
        _assert_clean(info.value, secret)
    # Length prefixes: shifting text between table and column is a different place.
    a = _enc(ring, b"x", table="ab", column="c")
    with pytest.raises(DecryptionError):
        _dec(ring, a, table="a", column="bc")


def test_unknown_kid_and_rotation() -> None:
    assert issubclass(DecryptionError, DataLayerError)
    old = Keyring([("k1", K1)])
    legacy = _enc(old, b"old data")
    rotated = Keyring([("k2", K2), ("k1", K1)])
    assert _dec(rotated, legacy) == b"old data"
    assert rotated.needs_reencrypt(legacy) and rotated.active_kid == "k2"
    fresh = _enc(rotated, b"new data")
    assert Keyring.key_id_of(fresh) == "k2" and not rotated.needs_reencrypt(fresh)
    assert _dec(rotated, fresh) == b"new data"
    only_new = Keyring([("k2", K2)])
    with pytest.raises(DecryptionError) as info:
        _dec(only_new, legacy)
    assert "'k1'" in str(info.value) and "not in the keyring" in str(info.value)
    _assert_clean(info.value, b"old data")
    with pytest.raises(DecryptionError):
        _dec(old, fresh)
    # Same kid, different key material: authentication fails rather than garbage coming back.
    with pytest.raises(DecryptionError):
        _dec(Keyring([("k1", K2)]), legacy)


def test_repr_and_errors_hide_key_material() -> None:
    ring = Keyring([("k2", K2), ("k1", K1)])
    text = repr(ring)
    assert "k1" in text and "k2" in text
    assert all(k not in text for k in KEYS_IN_TEXT) and repr(K1) not in text
    assert ring.kids == ("k2", "k1")


def test_keyring_construction_is_checked() -> None:
    for keys in ([], [("k1", K1[:31])], [("k1", K1), ("k1", K2)], [("ключ", K1)],
                 [("k" * 256, K1)]):
        with pytest.raises(ConfigError) as info:
            Keyring(keys)
        _assert_clean(info.value)


def test_decrypt_str_of_binary_and_bad_places() -> None:
    ring = Keyring([("k1", K1)])
    with pytest.raises(DecryptionError):
        ring.decrypt_str(_enc(ring, b"\xff\xfe"), **PLACE)  # type: ignore[arg-type]
    for place in ({"org_id": str(ORG)}, {"table": ""}, {"column": ""}, {"row_id": 5}):
        with pytest.raises(ValidationError):
            _enc(ring, b"x", **place)


def test_generate_key() -> None:
    key = Keyring.generate_key()
    assert len(base64.b64decode(key, validate=True)) == 32
    assert key != Keyring.generate_key()
    assert Keyring(parse_keys(f"gen:{key}")).active_kid == "gen"


def test_from_settings_uses_configured_keys() -> None:
    b64 = base64.b64encode
    s = Settings(env="testing", keys=f"k2:{b64(K2).decode()},k1:{b64(K1).decode()}")
    ring = Keyring.from_settings(s)
    assert ring.kids == ("k2", "k1")
    assert _dec(ring, _enc(Keyring([("k1", K1)]), b"v")) == b"v"


def test_from_settings_in_development_makes_a_throwaway_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="datalayer.security"):
        ring = Keyring.from_settings(Settings(env="development"))
        other = Keyring.from_settings(Settings(env="testing"))
    assert ring.active_kid == DEV_KID == "dev-ephemeral"
    warnings = [r for r in caplog.records if r.name == "datalayer.security"]
    assert len(warnings) == 2 and all(r.levelno == logging.WARNING for r in warnings)
    assert "restart" in warnings[0].getMessage()
    assert _dec(ring, _enc(ring, b"dev")) == b"dev"
    with pytest.raises(DecryptionError):  # each process gets its own key
        _dec(other, _enc(ring, b"dev"))


def test_production_without_keys_is_refused() -> None:
    with pytest.raises(ConfigError):
        Settings(env="production", database_url="postgresql://app@db:5432/x")
    # Settings already refuses; the keyring must refuse too if that check is ever bypassed.
    bypassed = object.__new__(Settings)
    for f in dataclasses.fields(Settings):
        object.__setattr__(bypassed, f.name, f.default)
    object.__setattr__(bypassed, "env", "production")
    with pytest.raises(ConfigError, match="DATALAYER_KEYS"):
        Keyring.from_settings(bypassed)


HYPO_RING = Keyring([("k2", K2), ("k1", K1)])
places = st.fixed_dictionaries({
    "org_id": st.none() | st.uuids(),
    "table": st.text(min_size=1, max_size=20),
    "row_id": st.text(max_size=20) | st.uuids(),
    "column": st.text(min_size=1, max_size=20),
})


def _norm(place: dict[str, object]) -> tuple[object, ...]:
    return (place["org_id"], place["table"], str(place["row_id"]), place["column"])


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(data=st.binary(max_size=512), place=places, other=places)
def test_property_roundtrip_only_at_its_place(
    data: bytes, place: dict[str, object], other: dict[str, object],
) -> None:
    blob = HYPO_RING.encrypt(data, **place)  # type: ignore[arg-type]
    assert HYPO_RING.decrypt(blob, **place) == data  # type: ignore[arg-type]
    hypothesis.assume(_norm(place) != _norm(other))
    with pytest.raises(DecryptionError):
        HYPO_RING.decrypt(blob, **other)  # type: ignore[arg-type]


# ---------------------------------------------------------------- TOTP

RFC_SEEDS = {
    "SHA1": b"12345678901234567890",
    "SHA256": b"12345678901234567890123456789012",
    "SHA512": b"1234567890123456789012345678901234567890123456789012345678901234",
}
RFC_VECTORS = [  # RFC 6238 appendix B: time, SHA1, SHA256, SHA512 (8 digits)
    (59, "94287082", "46119246", "90693936"),
    (1111111109, "07081804", "68084774", "25091201"),
    (1111111111, "14050471", "67062674", "99943326"),
    (1234567890, "89005924", "91819424", "93441116"),
    (2000000000, "69279037", "90698825", "38618901"),
    (20000000000, "65353130", "77737706", "47863826"),
]
SEED = RFC_SEEDS["SHA1"]


@pytest.mark.parametrize(("at", "sha1", "sha256", "sha512"), RFC_VECTORS)
def test_rfc6238_vectors(at: int, sha1: str, sha256: str, sha512: str) -> None:
    for alg, code in (("SHA1", sha1), ("SHA256", sha256), ("SHA512", sha512)):
        assert totp.now_code(RFC_SEEDS[alg], at, digits=8, algorithm=alg) == code  # type: ignore[arg-type]
        assert totp.verify(RFC_SEEDS[alg], code, at=at, digits=8,
                           algorithm=alg) == at // 30  # type: ignore[arg-type]
    assert totp.now_code(SEED, at) == sha1[-6:]


def test_six_digit_codes() -> None:
    assert totp.now_code(SEED, 59) == "287082"
    assert totp.now_code(SEED, 1111111109) == "081804"
    assert totp.verify(SEED, "081804", at=1111111109) == 1111111109 // 30


def test_window() -> None:
    at = 1_700_000_015.0
    step = totp.step_of(at)
    for delta in (-1, 0, 1):
        code = totp.now_code(SEED, at + delta * 30)
        assert totp.verify(SEED, code, at=at) == step + delta
    for delta in (-3, -2, 2, 3):
        assert totp.verify(SEED, totp.now_code(SEED, at + delta * 30), at=at) is None
    assert totp.verify(SEED, totp.now_code(SEED, at - 30), at=at, window=0) is None
    assert totp.verify(SEED, totp.now_code(SEED, at - 60), at=at, window=2) == step - 2


def test_replay_is_rejected() -> None:
    at = 1_700_000_015.0
    code = totp.now_code(SEED, at)
    used = totp.verify(SEED, code, at=at)
    assert used is not None
    assert totp.verify(SEED, code, at=at, last_used_step=used) is None
    assert totp.verify(SEED, code, at=at + 5, last_used_step=used) is None
    earlier = totp.now_code(SEED, at - 30)  # still in the window, but older than the used one
    assert totp.verify(SEED, earlier, at=at, last_used_step=used) is None
    later = totp.now_code(SEED, at + 30)
    assert totp.verify(SEED, later, at=at + 30, last_used_step=used) == used + 1


def test_malformed_codes_are_rejected() -> None:
    at = 59
    fullwidth = "\uff12\uff18\uff17\uff10\uff18\uff12"  # str.isdigit() is True for these
    for bad in ("28708", "2870820", "28708a", " 287082", "287082 ", "", fullwidth,
                "287 82", "+87082", "94287082"):
        assert totp.verify(SEED, bad, at=at) is None
    assert totp.verify(SEED, "287082", at=at) == 1


def test_secret_uri_and_arguments() -> None:
    secret = totp.new_secret()
    assert len(secret) == 20 and secret != totp.new_secret()
    uri = totp.provisioning_uri(secret, "ada@example.com", "Acme Flows")
    parts = urlsplit(uri)
    assert (parts.scheme, parts.netloc) == ("otpauth", "totp")
    assert unquote(parts.path) == "/Acme Flows:ada@example.com"
    q = {k: v[0] for k, v in parse_qs(parts.query).items()}
    b32 = q["secret"]
    assert "=" not in b32 and base64.b32decode(b32 + "=" * (-len(b32) % 8)) == secret
    assert (q["issuer"], q["algorithm"], q["digits"], q["period"]) == (
        "Acme Flows", "SHA1", "6", "30")
    for account, issuer in (("a:b", "Acme"), ("ada", "Ac:me"), ("", "Acme")):
        with pytest.raises(ValidationError):
            totp.provisioning_uri(secret, account, issuer)
    for call in (lambda: totp.now_code(b"short", 59), lambda: totp.now_code(SEED, -1),
                 lambda: totp.verify(SEED, "287082", at=59, window=50),
                 lambda: totp.now_code(SEED, 59, digits=5)):
        with pytest.raises(ValidationError):
            call()
    assert len(totp.now_code(secret)) == 6
