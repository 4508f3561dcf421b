"""Joining a cluster by address: one that listens on loopback only (rayft's embedded
cluster) is told apart from one that answers on the machine's own address too."""

import socket

from services.ray_compat import joins_loopback_cluster


def _listening(host: str) -> socket.socket:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind((host, 0))
    server.listen()
    return server


def test_a_port_open_on_loopback_only_is_a_loopback_cluster():
    with _listening("127.0.0.1") as server:
        port = server.getsockname()[1]
        assert joins_loopback_cluster(f"127.0.0.1:{port}")
        assert joins_loopback_cluster(f"localhost:{port}")


def test_a_port_open_on_every_interface_is_joined_as_usual():
    with _listening("0.0.0.0") as server:
        assert not joins_loopback_cluster(f"127.0.0.1:{server.getsockname()[1]}")


def test_other_addresses_are_joined_as_usual():
    for address in ("auto", "ray://10.0.0.5:10001", "10.0.0.5:6379", "127.0.0.1"):
        assert not joins_loopback_cluster(address)
