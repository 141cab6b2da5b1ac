"""The bearer token (over plaintext), TLS and mutual TLS, against the real server."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from room_allocator import AsyncRoomClient, Resolved, RoomClient, Unauthenticated, Unavailable

from certs import Pki, make_pki
from conftest import Server, ServerFactory

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def token_server(server_factory: ServerFactory) -> Server:
    return server_factory(token=TOKEN)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


@pytest.fixture(scope="module")
def tls_server(server_factory: ServerFactory, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Server:
    files = pki.write(tmp_path_factory.mktemp("tls"))
    return server_factory("--tls-cert", str(files["server_cert"]), "--tls-key", str(files["server_key"]))


@pytest.fixture(scope="module")
def mtls_server(server_factory: ServerFactory, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Server:
    files = pki.write(tmp_path_factory.mktemp("mtls"))
    return server_factory(
        "--tls-cert",
        str(files["server_cert"]),
        "--tls-key",
        str(files["server_key"]),
        "--tls-client-ca",
        str(files["ca"]),
    )


def test_the_token_travels_as_metadata_over_plaintext(token_server: Server, worker: str) -> None:
    with RoomClient(token_server.address, token=TOKEN) as admin:
        assert admin.register(worker, 2).dp_size == 2
        room = admin.allocate(worker, 1, 2)
        assert admin.resolve(room) == Resolved(worker, 1, 2)
        admin.deregister(worker)


def test_admin_calls_without_the_token_are_unauthenticated(token_server: Server, worker: str) -> None:
    with RoomClient(token_server.address) as router, RoomClient(token_server.address, token="wrong") as wrong:
        for client in (router, wrong):
            with pytest.raises(Unauthenticated) as raised:
                client.register(worker, 2)
            assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert raised.value.reason == "UNAUTHENTICATED"
        # Registering through AllocateRoom is an admin act too: the lease
        # finds no worker, and the fallback AllocateRoom is refused.
        with pytest.raises(Unauthenticated):
            router.allocate(worker, 0, 2)
        with RoomClient(token_server.address, token=f"  {TOKEN}\n") as admin:  # trimmed, as in the Rust client
            admin.register(worker, 2)
        # With a token configured every allocator call needs it by default.
        with pytest.raises(Unauthenticated):
            router.allocate(worker, 1, 2)
        with pytest.raises(Unauthenticated):
            router.deregister(worker)
        with RoomClient(token_server.address, token=TOKEN) as admin:
            assert admin.allocate(worker, 1, 2) % 2 == 1


def test_allocation_without_the_token_only_where_the_server_allows_it(server_factory: ServerFactory, worker: str) -> None:
    open_server = server_factory("--allow-unauthenticated-allocation", token=TOKEN)
    with RoomClient(open_server.address, token=TOKEN) as admin, RoomClient(open_server.address) as router:
        admin.register(worker, 2)
        assert router.allocate(worker, 1, 2) % 2 == 1
        with pytest.raises(Unauthenticated):
            router.register(worker, 4)
        with pytest.raises(Unauthenticated):
            router.deregister(worker)


def test_the_async_client_sends_the_token(token_server: Server, worker: str) -> None:
    async def main() -> None:
        async with AsyncRoomClient(token_server.address) as router:
            with pytest.raises(Unauthenticated):
                await router.register(worker, 4)
        async with AsyncRoomClient(token_server.address, token=TOKEN) as admin:
            await admin.register(worker, 4)
            assert await admin.allocate(worker, 3, 4) % 4 == 3
            await admin.deregister(worker)

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_token_required_for_allocation(server_factory: ServerFactory, worker: str) -> None:
    strict = server_factory("--auth-required-for-allocation", token=TOKEN)
    with RoomClient(strict.address, token=TOKEN) as admin, RoomClient(strict.address) as router:
        admin.register(worker, 2)
        assert admin.allocate(worker, 0, 2) % 2 == 0
        with pytest.raises(Unauthenticated):
            router.allocate(worker, 0, 2)
        with pytest.raises(Unauthenticated):
            router.resolve(1)


def test_token_must_be_printable_ascii() -> None:
    with pytest.raises(ValueError, match="ASCII"):
        RoomClient("127.0.0.1:1", token="tök")
    with pytest.raises(ValueError, match="ASCII"):
        RoomClient("127.0.0.1:1", token="a\nb")


def test_tls(tls_server: Server, pki: Pki, worker: str) -> None:
    with RoomClient(tls_server.address, root_certificates=pki.ca.cert) as client:
        client.register(worker, 2)
        assert client.allocate(worker, 1, 2) % 2 == 1
    # By name, as a URL, and with the name to check given apart.
    port = tls_server.address.rsplit(":", 1)[1]
    with RoomClient(f"https://localhost:{port}", root_certificates=pki.ca.cert) as client:
        assert client.allocate(worker, 0, 2) % 2 == 0
    with RoomClient(tls_server.address, root_certificates=pki.ca.cert, tls_server_name="localhost") as client:
        assert client.allocate(worker, 0, 2) % 2 == 0


def test_tls_failures_are_unavailable(tls_server: Server, pki: Pki, worker: str) -> None:
    with RoomClient(tls_server.address, root_certificates=pki.other_ca.cert, timeout=3) as untrusting:
        with pytest.raises(Unavailable):
            untrusting.register(worker, 2)
    with RoomClient(tls_server.address, timeout=3) as plaintext:
        with pytest.raises(Unavailable):
            plaintext.register(worker, 2)


def test_async_tls(tls_server: Server, pki: Pki, worker: str) -> None:
    async def main() -> None:
        async with AsyncRoomClient(tls_server.address, root_certificates=pki.ca.cert) as client:
            await client.register(worker, 3)
            assert await client.allocate(worker, 2, 3) % 3 == 2

    asyncio.run(asyncio.wait_for(main(), 30))


def test_mutual_tls(mtls_server: Server, pki: Pki, worker: str) -> None:
    with RoomClient(
        mtls_server.address,
        root_certificates=pki.ca.cert,
        private_key=pki.client.key,
        certificate_chain=pki.client.cert,
    ) as client:
        client.register(worker, 4)
        room = client.allocate(worker, 3, 4)
        assert client.resolve(room) == Resolved(worker, 3, 4)
    with RoomClient(mtls_server.address, root_certificates=pki.ca.cert, timeout=3) as anonymous:
        with pytest.raises(Unavailable):
            anonymous.resolve(room)

    async def main() -> None:
        async with AsyncRoomClient(
            mtls_server.address,
            root_certificates=pki.ca.cert,
            private_key=pki.client.key,
            certificate_chain=pki.client.cert,
        ) as client:
            assert (await client.resolve(room)).dp_rank == 3

    asyncio.run(asyncio.wait_for(main(), 30))

