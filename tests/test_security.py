"""NATS over TLS, mutual TLS and with credentials (an nkey user, a JWT `.creds` user), for the
worker and the client (docs/security.md), each against a real nats-server configured for it.

The test makes its own secrets: `openssl` a CA, a server certificate for 127.0.0.1/localhost,
a client certificate and a second, unrelated CA; the `nkeys` and `nats-jwt` packages an nkey
user and an operator, account and user for a server in operator (JWT) mode.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Iterator

import pytest

import dbtask
from e2e_support import Server, free_port, start_nats
from e2e_tasks import add

MODES = ["tls", "mtls", "nkey", "creds"]


# -- secrets made by the test ------------------------------------------------------------------


def _openssl(cwd: Path, *args: str) -> None:
    openssl = shutil.which("openssl")
    assert openssl, "these tests make their certificates with the openssl command: apt-get install openssl"
    done = subprocess.run([openssl, *args], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, f"openssl {' '.join(args)}:\n{done.stderr}"


def _ca(d: Path, name: str) -> None:
    _openssl(
        d, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN=dbtask test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip


def _leaf(d: Path, name: str, ca: str, usage: str, san: str) -> None:
    _openssl(
        d, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=dbtask test {name}",
    )  # fmt: skip
    (d / f"{name}.ext").write_text(
        f"basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage={usage}\n"
        + (f"subjectAltName={san}\n" if san else "")
    )
    _openssl(
        d, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-set_serial", str(uuid.uuid4().int >> 64), "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem",
    )  # fmt: skip


class Secrets:
    """Paths of everything the servers and the connections need, and the server configs."""

    def __init__(self, d: Path) -> None:
        self.dir = d
        _ca(d, "ca")
        _ca(d, "other-ca")
        _leaf(d, "server", "ca", "serverAuth", "IP:127.0.0.1,DNS:localhost")
        _leaf(d, "client", "ca", "clientAuth", "")
        self.ca, self.other_ca = d / "ca.pem", d / "other-ca.pem"

        import nkeys
        from nats_jwt.nkeys_ext import create_account_pair, create_operator_pair, create_user_pair
        from nats_jwt.v2.account_claims import AccountClaims
        from nats_jwt.v2.operator_claims import OperatorClaims
        from nats_jwt.v2.user_claims import UserClaims

        # An nkey user of a server with an authorization block, and one it does not know.
        user, stranger = create_user_pair(), create_user_pair()
        self.nkey_public = user.public_key.decode()
        self.nkey_seed = user.seed.decode()
        self.nkey = d / "user.nk"
        self.nkey.write_text(self.nkey_seed + "\n")
        self.stranger_seed = stranger.seed.decode()
        self.stranger = d / "stranger.nk"
        self.stranger.write_text(self.stranger_seed + "\n")
        assert nkeys.from_seed(user.seed).public_key == user.public_key

        # Operator mode: an operator, a system account, an account with JetStream, its user.
        operator = create_operator_pair()
        operator_jwt = OperatorClaims(operator.public_key.decode(), "dbtask-test").encode(operator)
        account = create_account_pair()
        claims = AccountClaims(account.public_key.decode(), "dbtask")
        for limit in ("memory_storage", "disk_storage", "streams", "consumer"):
            setattr(claims.nats.limits, limit, -1)
        account_jwt = claims.encode(operator)
        system = create_account_pair()
        system_jwt = AccountClaims(system.public_key.decode(), "SYS").encode(operator)
        jwt_user = create_user_pair()
        user_jwt = UserClaims(jwt_user.public_key.decode(), "dbtask").encode(account)
        self.creds = d / "user.creds"
        self.creds.write_text(
            f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{jwt_user.seed.decode()}\n------END USER NKEY SEED------\n"
        )
        self.operator_config = (
            f'operator: "{operator_jwt}"\nsystem_account: {system.public_key.decode()}\n'
            f"resolver: MEMORY\nresolver_preload: {{\n"
            f'  {account.public_key.decode()}: "{account_jwt}"\n  {system.public_key.decode()}: "{system_jwt}"\n}}\n'
        )

    def server_config(self, mode: str) -> str:
        tls = f'  cert_file: "{self.dir / "server.pem"}"\n  key_file: "{self.dir / "server.key"}"\n'
        if mode == "tls":
            return f"tls {{\n{tls}}}\n"
        if mode == "mtls":
            return f'tls {{\n{tls}  ca_file: "{self.ca}"\n  verify: true\n}}\n'
        if mode == "nkey":
            return f'authorization {{\n  users: [ {{ nkey: "{self.nkey_public}" }} ]\n}}\n'
        if mode == "creds":
            return self.operator_config
        raise ValueError(mode)

    def settings(self, mode: str) -> dict[str, str]:
        """The client's `init()` keywords for `mode` (the worker's flags have the same names)."""
        if mode == "tls":
            return {"nats_tls_ca": str(self.ca)}
        if mode == "mtls":
            return {
                "nats_tls_ca": str(self.ca),
                "nats_tls_cert": str(self.dir / "client.pem"),
                "nats_tls_key": str(self.dir / "client.key"),
            }
        if mode == "nkey":
            return {"nats_nkey": str(self.nkey)}
        if mode == "creds":
            return {"nats_creds": str(self.creds)}
        raise ValueError(mode)


def flags(settings: dict[str, str]) -> list[str]:
    """The worker's command-line flags for the client's keywords: nats_tls_ca -> --nats-tls-ca."""
    out: list[str] = []
    for name, value in settings.items():
        out += ["--" + name.replace("_", "-"), value]
    return out


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> Secrets:
    return Secrets(tmp_path_factory.mktemp("secrets"))


@pytest.fixture
def nats(request: pytest.FixtureRequest, secrets: Secrets, tmp_path: Path, logs: list) -> Iterator[Server]:
    """This test's nats-server, configured for the mode the test is parametrized with."""
    server = start_nats(tmp_path / "nats", config=secrets.server_config(request.param))
    logs.append(server)
    yield server
    server.stop()


# -- worker and client together ----------------------------------------------------------------


@pytest.mark.parametrize("nats", MODES, indirect=True)
async def test_worker_runs_a_task_and_the_client_gets_its_result(nats, redis, worker_factory, secrets, request):
    mode = request.node.callspec.params["nats"]
    settings = secrets.settings(mode)
    worker_factory(args=flags(settings))
    await dbtask.init(nats_url=nats.url, redis_url=redis.url, **settings)
    try:
        assert await (await add.delay(20, 22)).get(timeout=15) == 42
    finally:
        await dbtask.close()


@pytest.mark.parametrize("nats", ["tls"], indirect=True)
def test_worker_with_a_wrong_ca_names_the_setting(nats, worker_factory, secrets):
    w = worker_factory(args=["--nats-tls-ca", str(secrets.other_ca)], ready=False)
    assert w.wait(30) != 0
    assert "TLS with NATS" in w.stderr and "UnknownIssuer" in w.stderr
    assert "check --nats-tls-ca (the CA that signed the server's certificate" in w.stderr


@pytest.mark.parametrize("nats", ["nkey"], indirect=True)
def test_worker_refused_nkey_names_the_setting_and_hides_the_seed(nats, worker_factory, secrets):
    w = worker_factory(args=["--nats-nkey", str(secrets.stranger)], ready=False)
    assert w.wait(30) != 0
    assert "refused" in w.stderr and "check the --nats-nkey seed" in w.stderr
    assert secrets.stranger_seed not in w.stderr


# -- the worker's settings, checked before it connects -----------------------------------------


@pytest.mark.parametrize("nats", ["tls"], indirect=True)
@pytest.mark.parametrize(
    "flag",
    ["--nats-tls-ca", "--nats-tls-cert", "--nats-tls-key", "--nats-creds", "--nats-nkey"],
)
def test_worker_with_a_missing_file_names_the_flag(nats, worker_factory, tmp_path, flag):
    missing = tmp_path / "missing.pem"
    w = worker_factory(args=[flag, str(missing)], ready=False)
    assert w.wait(30) == 2, "a setting that cannot be used exits with 2, like a bad flag"
    # A certificate and its key go together; every other flag names its own file.
    if flag == "--nats-tls-cert":
        assert f"{flag} {missing}: a client certificate needs its key: give --nats-tls-key too" in w.stderr
    elif flag == "--nats-tls-key":
        assert f"{flag} {missing}: a key needs its client certificate: give --nats-tls-cert too" in w.stderr
    else:
        assert f"{flag} {missing}: file not found" in w.stderr


@pytest.mark.parametrize("nats", ["nkey"], indirect=True)
def test_worker_with_a_wrong_file_says_what_it_expected_and_hides_the_contents(nats, worker_factory, secrets):
    # The nkey seed given where a .creds file belongs: refused without showing the seed.
    w = worker_factory(args=["--nats-creds", str(secrets.nkey)], ready=False)
    assert w.wait(30) == 2
    assert "--nats-creds" in w.stderr and "credentials file" in w.stderr
    assert secrets.nkey_seed not in w.stderr


# -- the client --------------------------------------------------------------------------------


@pytest.mark.parametrize("nats", MODES, indirect=True)
async def test_client_publishes_with_the_settings_and_is_refused_without(nats, redis, secrets, request):
    mode = request.node.callspec.params["nats"]
    with pytest.raises(ConnectionError) as refused:
        await dbtask.init(nats_url=nats.url, redis_url=redis.url, timeout=3)
    hint = {"tls": "nats_tls_ca", "mtls": "nats_tls_ca", "nkey": "nats_nkey", "creds": "nats_creds"}[mode]
    assert hint in str(refused.value)

    await dbtask.init(nats_url=nats.url, redis_url=redis.url, **secrets.settings(mode))
    try:
        # Returns once JetStream stored the message, over the secured connection.
        result = await add.delay(1, 2)
        assert await result.state() == "PENDING"
        # The same settings keep the client; other ones would replace it.
        client = dbtask._client.current()
        await dbtask.init(nats_url=nats.url, redis_url=redis.url, **secrets.settings(mode))
        assert dbtask._client.current() is client
    finally:
        await dbtask.close()


@pytest.mark.parametrize("nats", ["mtls"], indirect=True)
async def test_client_without_a_certificate_is_told_to_give_one(nats, redis, secrets):
    with pytest.raises(ConnectionError) as info:
        await dbtask.init(nats_url=nats.url, redis_url=redis.url, nats_tls_ca=str(secrets.ca), timeout=3)
    assert "TLS with NATS" in str(info.value)
    assert "nats_tls_cert" in str(info.value)


@pytest.mark.parametrize("nats", ["tls"], indirect=True)
async def test_client_with_a_wrong_ca_names_the_setting(nats, redis, secrets):
    with pytest.raises(ConnectionError) as info:
        await dbtask.init(nats_url=nats.url, redis_url=redis.url, nats_tls_ca=str(secrets.other_ca), timeout=3)
    message = str(info.value)
    assert "TLS with NATS" in message and "nats_tls_ca" in message
    assert "UnknownIssuer" in message or "unknown issuer" in message.lower(), message


@pytest.mark.parametrize("nats", ["nkey"], indirect=True)
async def test_client_refused_nkey_names_the_setting_and_hides_the_seed(nats, redis, secrets):
    with pytest.raises(ConnectionError) as info:
        await dbtask.init(nats_url=nats.url, redis_url=redis.url, nats_nkey=str(secrets.stranger), timeout=3)
    assert "refused" in str(info.value) and "nats_nkey" in str(info.value)
    assert secrets.stranger_seed not in str(info.value)


@pytest.mark.parametrize("nats", ["tls"], indirect=True)
async def test_client_with_a_missing_or_wrong_file_raises_value_error(nats, redis, secrets, tmp_path):
    missing = tmp_path / "missing.pem"
    with pytest.raises(ValueError) as info:
        await dbtask.init(nats_url=nats.url, redis_url=redis.url, nats_tls_ca=missing)
    assert str(info.value) == f'nats_tls_ca="{missing}": file not found'
    with pytest.raises(ValueError) as info:
        dbtask.init_sync(nats_url=nats.url, redis_url=redis.url, nats_creds=str(secrets.nkey))
    assert "nats_creds" in str(info.value) and "credentials file" in str(info.value)
    assert secrets.nkey_seed not in str(info.value)
    with pytest.raises(TypeError):
        await dbtask.init(nats_url=nats.url, redis_url=redis.url, nats_tls_ca=42)  # type: ignore[arg-type]


@pytest.mark.parametrize("nats", MODES, indirect=True)
async def test_tls_and_credential_files_serve_every_seed_of_a_list(nats, redis, worker_factory, secrets, request):
    """Issue 18: with a seeds list (whose first seed does not answer) the same files secure
    and sign in the connection to whichever seed answers, for the worker and the client."""
    settings = secrets.settings(request.node.callspec.params["nats"])
    seeds = f"nats://127.0.0.1:{free_port()},{nats.url}"
    worker_factory(nats_url=seeds, args=flags(settings))
    await dbtask.init(nats_url=seeds, redis_url=redis.url, **settings)
    try:
        assert await (await add.delay(20, 22)).get(timeout=15) == 42
    finally:
        await dbtask.close()
