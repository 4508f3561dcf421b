"""The private Ray core names rayft uses, in one place, for the Ray versions in
`rollout.stack.SUPPORTED["ray"]` (checked when this module is imported). Each has no
public equivalent in that Ray; the reason is given with it. Ray Serve LLM's private
names are in services.ray_llm_compat (importing them imports vLLM, so they stay apart
from these, which the CLI imports).

Light to import: Ray's modules are imported inside the functions.
"""

from __future__ import annotations

import contextlib

from rollout.stack import require

require("ray")

# Loggers of Ray's own that the CLI quiets (their messages are about Ray, not the run).
PACKAGING_LOGGER = "ray._private.runtime_env.packaging"          # "Uploading package ..."
TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def use_token_auth_if_available() -> None:
    """Send the Ray auth token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)
    when this machine has one. Ray does this by itself only for `address="auto"`."""
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


@contextlib.contextmanager
def loopback_node():
    """A local cluster started inside this block gets 127.0.0.1 as its node address, so
    its GCS, raylet and agents listen on loopback only. It is what Ray does where it runs
    single-node only (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), but that variable is read once
    when Ray is imported, and `ray.init(_node_ip_address="127.0.0.1")` is turned back into
    the machine's address; so the flag it sets is set for the start-up only. Once started,
    Ray reads the node's address from the node itself."""
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def joins_loopback_cluster(address: str) -> bool:
    """Whether `address` (host:port) names a cluster on this machine that listens on
    loopback only, as rayft's embedded cluster does. Ray turns a loopback host into the
    machine's own address before connecting (where such a cluster does not answer), and
    its driver then looks for a raylet at that address; so joining one must happen inside
    `loopback_node()`. A cluster started with `ray start` answers on the machine's address
    too, and is joined as usual."""
    import socket

    from ray._private.services import node_ip_address_from_perspective

    host, sep, port = address.rpartition(":")
    if not sep or host.strip("[]") not in LOOPBACK_HOSTS or not port.isdigit():
        return False
    try:
        with socket.create_connection((node_ip_address_from_perspective(), int(port)), timeout=2):
            return False  # it answers beyond loopback: a cluster like any other
    except OSError:
        return True


def actor_table() -> dict[str, dict]:
    """The GCS actor table (actor id -> its record), alive and dead actors alike. The public
    State API (ray.util.state) reads it through the dashboard, which the embedded cluster
    does not run."""
    from ray._private.state import state

    return state.actor_table(None)


def placement_groups_created_by(actor_ids: set[str]) -> list:
    """The placement groups not yet removed whose creator is one of `actor_ids` (hex), as
    PlacementGroup handles. The creator is only in the raw GCS table (not in
    ray.util.placement_group_table's records)."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup

    out = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if pg.state != gcs_pb2.PlacementGroupTableData.REMOVED and pg.creator_actor_id.hex() in actor_ids:
            out.append(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
    return out


def path_spec(patterns: list[str]):
    """Ray's own gitignore-style matcher (the one that applies .rayignore to a job's
    working_dir), so rayft names exactly what Ray leaves out; Ray vendors it."""
    from ray._private.thirdparty.pathspec import PathSpec

    return PathSpec.from_lines("gitwildmatch", patterns)
