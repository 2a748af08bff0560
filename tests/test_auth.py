"""Account security: passwords, lockout, single-use tokens, invitations, TOTP 2FA."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from datalayer import Context, DataLayer, PermissionDenied, Settings, ValidationError
from datalayer.security import DecryptionError, PasswordHasher, PasswordPolicy, totp
from tests.conftest import FAST_PASSWORDS, MemberFactory, Tenant, TenantFactory, email_for

PASSWORD = "correct horse battery staple"
ANON = Context(None)


async def registered(dl: DataLayer, t: Tenant, add_member: MemberFactory) -> tuple[Context, str]:
    ctx = await add_member(t, "member", password=PASSWORD)
    assert ctx.user_id is not None
    return ctx, email_for(ctx.user_id)


async def test_login_succeeds_and_resets_the_counter(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
    admin_conn: asyncpg.Connection,
) -> None:
    ctx, email = await registered(dl, await make_tenant(), add_member)
    async with dl.session(ANON) as db:
        assert (await db.auth.login(email, "wrong")).outcome == "invalid"
        ok = await db.auth.login(email.upper(), PASSWORD)
    assert ok.ok and ok.user_id == ctx.user_id
    row = await admin_conn.fetchrow("SELECT failed_logins, last_login_at, password_hash "
                                    "FROM users WHERE id = $1", ctx.user_id)
    assert row is not None
    assert (row["failed_logins"], row["last_login_at"] is not None) == (0, True)
    assert row["password_hash"].startswith("$argon2id$") and PASSWORD not in row["password_hash"]


async def test_unknown_email_is_invalid(dl: DataLayer) -> None:
    async with dl.session(ANON) as db:
        assert (await db.auth.login("nobody@example.test", PASSWORD)).outcome == "invalid"


async def test_lockout_with_backoff_that_an_attacker_cannot_extend(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
    admin_conn: asyncpg.Connection,
) -> None:
    ctx, email = await registered(dl, await make_tenant(), add_member)
    async with dl.session(ANON) as db:
        outcomes = [(await db.auth.login(email, f"wrong{i}")).outcome for i in range(5)]
        assert outcomes == ["invalid"] * 4 + ["locked"]
        until = await db.auth.lockout_status(email)
        assert until is not None
        # while locked: even the right password is refused, and nothing is counted
        again = await db.auth.login(email, PASSWORD)
        await db.auth.login(email, "wrong again")
    assert again.outcome == "locked" and again.user_id is None
    row = await admin_conn.fetchrow("SELECT failed_logins, locked_until FROM users "
                                    "WHERE id = $1", ctx.user_id)
    assert row is not None and (row["failed_logins"], row["locked_until"]) == (5, until)
    # the lock expires by itself; the next failure doubles it, capped at 15 minutes
    await admin_conn.execute("UPDATE users SET locked_until = now() - interval '1 ms' "
                             "WHERE id = $1", ctx.user_id)
    async with dl.session(ANON) as db:
        sixth = await db.auth.login(email, "wrong6")
    assert sixth.outcome == "locked"
    secs = await admin_conn.fetchval("SELECT extract(epoch FROM locked_until - now()) "
                                     "FROM users WHERE id = $1", ctx.user_id)
    assert 1.0 < secs <= 2.0
    await admin_conn.execute("UPDATE users SET locked_until = NULL, failed_logins = 40 "
                             "WHERE id = $1", ctx.user_id)
    async with dl.session(ANON) as db:
        await db.auth.login(email, "wrong41")
    capped = await admin_conn.fetchval("SELECT extract(epoch FROM locked_until - now()) "
                                       "FROM users WHERE id = $1", ctx.user_id)
    assert 890 < capped <= 900
    # a password reset clears the lock
    async with dl.session(ANON) as db:
        token = await db.auth.issue_token("password_reset", email)
        assert token is not None
        assert await db.auth.consume_token("password_reset", token, new_password="new pass")
        assert (await db.auth.login(email, "new pass")).ok


async def test_successful_login_upgrades_an_outdated_hash(
    settings: Settings, dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
    admin_conn: asyncpg.Connection,
) -> None:
    ctx, email = await registered(dl, await make_tenant(), add_member)
    before = await admin_conn.fetchval("SELECT password_hash FROM users WHERE id = $1",
                                       ctx.user_id)
    stronger = PasswordHasher(PasswordPolicy(memory_kib=FAST_PASSWORDS.memory_kib * 2,
                                             iterations=2))
    async with DataLayer(settings, passwords=stronger) as strong, strong.session(ANON) as db:
        assert (await db.auth.login(email, PASSWORD)).ok
    after = await admin_conn.fetchval("SELECT password_hash FROM users WHERE id = $1",
                                      ctx.user_id)
    assert before != after and "m=2048,t=2" in after
    assert not stronger.needs_rehash(after)


async def test_tokens_are_single_use_and_a_new_one_supersedes_the_old(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
    admin_conn: asyncpg.Connection,
) -> None:
    ctx, email = await registered(dl, await make_tenant(), add_member)
    async with dl.session(ANON) as db:
        old = await db.auth.issue_token("email_verification", email)
        new = await db.auth.issue_token("email_verification", email)
        assert old and new and old != new
        assert await db.auth.consume_token("email_verification", old) is None
        use = await db.auth.consume_token("email_verification", new)
        assert use is not None and use.user_id == ctx.user_id
        assert await db.auth.consume_token("email_verification", new) is None
        assert await db.auth.issue_token("password_reset", "nobody@example.test") is None
    assert await admin_conn.fetchval("SELECT email_verified_at FROM users WHERE id = $1",
                                     ctx.user_id) is not None
    stored = await admin_conn.fetch("SELECT token_hash FROM auth_tokens WHERE user_id = $1",
                                    ctx.user_id)
    assert all(old.encode() not in bytes(r["token_hash"]) for r in stored)


async def test_expired_token_and_wrong_kind_are_refused(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
    admin_conn: asyncpg.Connection,
) -> None:
    ctx, email = await registered(dl, await make_tenant(), add_member)
    async with dl.session(ANON) as db:
        token = await db.auth.issue_token("password_reset", email)
        assert token is not None
        assert await db.auth.consume_token("email_verification", token) is None
    await admin_conn.execute("UPDATE auth_tokens SET expires_at = now() - interval '1 s' "
                             "WHERE user_id = $1", ctx.user_id)
    async with dl.session(ANON) as db:
        assert await db.auth.consume_token("password_reset", token, new_password="x1") is None
        with pytest.raises(ValidationError, match="needs new_password"):
            await db.auth.consume_token("password_reset", token)


async def test_concurrent_consumers_of_one_token_succeed_once(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
) -> None:
    _, email = await registered(dl, await make_tenant(), add_member)
    async with dl.session(ANON) as db:
        token = await db.auth.issue_token("email_verification", email)
    assert token is not None

    async def consume() -> bool:
        async with dl.session(ANON) as db:
            return await db.auth.consume_token("email_verification", token) is not None

    results = await asyncio.gather(*(consume() for _ in range(8)))
    assert sorted(results) == [False] * 7 + [True]


async def test_invitation_flow(dl: DataLayer, make_tenant: TenantFactory,
                               add_member: MemberFactory) -> None:
    t, other_org = await make_tenant(), await make_tenant()
    invitee, stranger = await add_member(other_org), await add_member(other_org)
    assert invitee.user_id is not None
    member = await add_member(t, "member")
    with pytest.raises(PermissionDenied, match="only an organization admin may invite"):
        async with dl.session(member) as db:
            await db.auth.invite(email_for(invitee.user_id))
    async with dl.session(t.owner) as db:
        token = await db.auth.invite(email_for(invitee.user_id), "viewer")
    with pytest.raises(PermissionDenied, match="another email address"):
        async with dl.session(Context(None, user_id=stranger.user_id)) as db:
            await db.auth.consume_token("invitation", token)
    async with dl.session(Context(None, user_id=invitee.user_id)) as db:
        use = await db.auth.consume_token("invitation", token)
    assert use is not None and (use.org_id, use.role) == (t.org_id, "viewer")
    async with dl.session(t.ctx("viewer", user_id=invitee.user_id), readonly=True) as db:
        me = await db.memberships.get(invitee.user_id)
    assert me is not None and me.role == "viewer"
    with pytest.raises(ValidationError, match="invitation role"):
        async with dl.session(t.owner) as db:
            await db.auth.invite("x@example.test", "owner")


async def test_two_factor_enable_login_replay_and_recovery(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
    admin_conn: asyncpg.Connection,
) -> None:
    ctx, email = await registered(dl, await make_tenant(), add_member)
    assert ctx.user_id is not None
    async with dl.session(ctx) as db:
        setup = await db.auth.enable_2fa(account=email)
    assert setup.uri.startswith("otpauth://totp/") and len(setup.recovery_codes) == 10
    secret = totp.new_secret()  # a wrong secret's codes never pass
    async with dl.session(ANON) as db:
        assert (await db.auth.login(email, PASSWORD)).ok  # not enabled until verified
        assert not await db.auth.verify_2fa(ctx.user_id, totp.now_code(secret))
    real = _secret_of(setup.uri)
    code = totp.now_code(real)
    async with dl.session(ANON) as db:
        assert await db.auth.verify_2fa(ctx.user_id, code)  # enables 2FA
        assert not await db.auth.verify_2fa(ctx.user_id, code)  # replay refused
        assert (await db.auth.login(email, PASSWORD)).outcome == "2fa_required"
        assert (await db.auth.login(email, PASSWORD, totp_code="000000")).outcome in (
            "2fa_invalid", "locked")
        assert await db.auth.use_recovery_code(ctx.user_id, setup.recovery_codes[0])
        assert not await db.auth.use_recovery_code(ctx.user_id, setup.recovery_codes[0])
    raw = await admin_conn.fetchval("SELECT totp_secret FROM users WHERE id = $1", ctx.user_id)
    assert real not in bytes(raw)
    tampered = bytes(raw[:-1]) + bytes([raw[-1] ^ 1])
    await admin_conn.execute("UPDATE users SET totp_secret = $2 WHERE id = $1",
                             ctx.user_id, tampered)
    with pytest.raises(DecryptionError):
        async with dl.session(ANON) as db:
            await db.auth.verify_2fa(ctx.user_id, code)


async def test_totp_secret_copied_to_another_user_does_not_decrypt(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
    admin_conn: asyncpg.Connection,
) -> None:
    t = await make_tenant()
    (a, _), (b, _) = await registered(dl, t, add_member), await registered(dl, t, add_member)
    async with dl.session(a) as db:
        setup = await db.auth.enable_2fa(account="a")
    async with dl.session(b) as db:
        await db.auth.enable_2fa(account="b")
    await admin_conn.execute("UPDATE users SET totp_secret = (SELECT totp_secret FROM users "
                             "WHERE id = $1) WHERE id = $2", a.user_id, b.user_id)
    with pytest.raises(DecryptionError):
        async with dl.session(ANON) as db:
            await db.auth.verify_2fa(b.user_id, totp.now_code(_secret_of(setup.uri)))  # type: ignore[arg-type]


async def test_register_needs_a_user_id_and_rejects_empty_passwords(dl: DataLayer) -> None:
    with pytest.raises(ValidationError, match="needs a Context whose user_id"):
        async with dl.session(ANON) as db:
            await db.auth.register(email="x@example.test", password=PASSWORD)
    with pytest.raises(ValidationError, match="password must be"):
        async with dl.session(Context(None, user_id=uuid.uuid4())) as db:
            await db.auth.register(email="y@example.test", password="")


def _secret_of(uri: str) -> bytes:
    import base64
    from urllib.parse import parse_qs, urlsplit

    b32 = parse_qs(urlsplit(uri).query)["secret"][0]
    return base64.b32decode(b32 + "=" * (-len(b32) % 8))
