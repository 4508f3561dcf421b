"""`rayft submit` and `rayft jobs`: runs submitted to a Ray cluster as Ray Jobs.

    rayft submit examples/sft_lora.yaml output_dir=/shared/runs --address http://HEAD:8265 --follow
    rayft jobs list --address http://HEAD:8265
    rayft jobs status|logs|stop JOB_ID --address http://HEAD:8265

The config is validated here first (a bad key exits 2 and nothing reaches the cluster).
The job gets the working directory (default: here) as its Ray runtime env working_dir, the
resolved config staged inside it, and rayft's own code when the working directory does
not hold it; it runs `python -m cluster.cli train <staged config>` on the cluster. The
address and token follow Ray's conventions; see docs/submit.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

from cluster import jobs_parts as parts
from trainers.errors import UserError

POLL_S = 0.5


def add_parsers(sub) -> None:
    conn = argparse.ArgumentParser(add_help=False)
    conn.add_argument("--address", metavar="URL",
                      help="the cluster's job server: its dashboard URL (http://HEAD:8265), 'auto' (a cluster on "
                           "this machine), a GCS host:port or ray://HEAD:10001 (default: for submit the "
                           "config's cluster.address; then $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS; then 'auto')")
    conn.add_argument("--auth-token", metavar="TOKEN",
                      help="the cluster's Ray auth token (default: $RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH, "
                           "then ~/.ray/auth_token; prefer those: flags show in ps)")

    p = sub.add_parser(
        "submit", parents=[conn], help="submit a training run to a Ray cluster as a Ray Job",
        description="Validate a training config here, then submit it to a Ray cluster as a Ray Job and print "
                    "the job id. The job's working directory is uploaded (models/ and data/ referenced by "
                    "relative paths travel with it; .git, .venv, runs/, caches are left out) together with "
                    "the resolved config; the run writes to output_dir on the cluster, which should be an "
                    "absolute path on shared storage. See docs/submit.md.",
        epilog="example: rayft submit examples/sft_lora.yaml output_dir=/shared/runs train.max_steps=50 "
               "--address http://127.0.0.1:8265 --follow")
    p.add_argument("config", help="YAML config file (as for `rayft train`)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--follow", action="store_true",
                   help="stream the job's logs until it ends; exit 0 if it succeeded, 1 otherwise")
    p.add_argument("--working-dir", metavar="DIR",
                   help="directory uploaded as the job's working directory; relative config paths resolve "
                        "in it (default: the current directory)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="also leave out of the upload this gitignore-style pattern; repeatable (a .rayignore "
                        "file in the working directory works too)")
    p.add_argument("--gitignore", action="store_true",
                   help="also leave out what .gitignore lists (Ray's default; off here because models/ and "
                        "data/ are usually git-ignored yet needed by the job)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job's processes; repeatable")
    p.add_argument("--submission-id", metavar="ID", help="the job id (default: rayft-<run name>-<8 hex>)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate and print what would be submitted, contacting nothing")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("jobs", help="list, inspect, follow and stop submitted Ray Jobs",
                       description="Inspect and control Ray Jobs on a cluster (those `rayft submit` started\n"
                                   "show their run name). Every action takes --address and --auth-token.",
                       epilog="examples:\n  rayft jobs list --address http://127.0.0.1:8265\n"
                              "  rayft jobs logs rayft-sft-lora-1a2b3c4d --follow\n"
                              "  rayft jobs stop rayft-sft-lora-1a2b3c4d",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    jsub = p.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)
    a = jsub.add_parser("list", parents=[conn], help="table of submitted jobs: id, status, run, start time",
                        description="List the cluster's submitted jobs, oldest first.")
    a.add_argument("--json", action="store_true", help="print the jobs as JSON")
    a.set_defaults(func=cmd_list)
    a = jsub.add_parser("status", parents=[conn], help="a job's status and message",
                        description="Print a job's status, message, run and times.")
    a.add_argument("job", metavar="JOB_ID", help="submission id (as `rayft submit` printed it)")
    a.add_argument("--json", action="store_true", help="print the job's details as JSON")
    a.set_defaults(func=cmd_status)
    a = jsub.add_parser("logs", parents=[conn], help="print (or follow) a job's logs",
                        description="Print a job's logs so far; with --follow, stream them until the job ends.")
    a.add_argument("job", metavar="JOB_ID", help="submission id")
    a.add_argument("--follow", action="store_true",
                   help="stream until the job ends; exit 0 if it succeeded, 1 otherwise")
    a.set_defaults(func=cmd_logs)
    a = jsub.add_parser("stop", parents=[conn], help="stop a running job",
                        description="Ask the cluster to stop a job (SIGTERM to its driver, then SIGKILL), and "
                                    "wait until it has stopped.")
    a.add_argument("job", metavar="JOB_ID", help="submission id")
    a.add_argument("--no-wait", action="store_true", help="return once the stop was requested")
    a.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="longest wait for the job to stop (default 60)")
    a.set_defaults(func=cmd_stop)


def cmd_submit(args) -> int:
    from cluster.config import load_config

    config = load_config(args.config, args.overrides)   # a bad key stops here: exit 2
    working_dir = Path(args.working_dir or os.getcwd()).expanduser().resolve()
    if not working_dir.is_dir():
        raise UserError(f"--working-dir {working_dir}: not a directory")
    excludes = [*parts.DEFAULT_EXCLUDES, *parts.output_excludes(config, working_dir), *args.exclude]
    parts.check_paths(config, working_dir, excludes + parts.rayignore_patterns(working_dir))
    sid = parts.submission_id(config.name, given=args.submission_id)
    staged = parts.staged_config_path(sid)
    env = parts.runtime_env(working_dir, excludes, parts.code_modules(working_dir), parts.parse_env(args.env))
    command = parts.entrypoint(staged)
    metadata = {"rayft_run": config.name, "rayft_method": config.method, "rayft_output_dir": config.output_dir,
                "rayft_config": str(args.config)}
    warning = parts.output_dir_warning(config)
    if warning:
        print(warning, file=sys.stderr)
    if args.dry_run:
        print(json.dumps({"submission_id": sid, "entrypoint": command, "runtime_env": env, "metadata": metadata,
                          "config": parts.job_config_dict(config)}, indent=2))
        return 0
    jobs = Jobs.connect(args.address, args.auth_token, config.cluster.address)
    path = working_dir / staged
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import yaml

        path.write_text(yaml.safe_dump(parts.job_config_dict(config), sort_keys=False), encoding="utf-8")
        ignore_gitignore = {} if args.gitignore else {"RAY_RUNTIME_ENV_IGNORE_GITIGNORE": "1"}
        with parts.environ(set_=ignore_gitignore):
            jobs.call(jobs.client.submit_job, entrypoint=command, submission_id=sid, runtime_env=env,
                      metadata=metadata)
    finally:
        path.unlink(missing_ok=True)
        for folder in (path.parent, path.parent.parent):
            with contextlib.suppress(OSError):
                folder.rmdir()   # only when empty
    print(f"job {sid} submitted to {jobs.url} (run {config.name} -> {config.run_dir})", flush=True)
    if args.follow:
        return jobs.follow(sid)
    where = f" --address {jobs.url}"
    print(f"  status: rayft jobs status {sid}{where}\n  logs:   rayft jobs logs {sid} --follow{where}\n"
          f"  stop:   rayft jobs stop {sid}{where}")
    return 0


def cmd_list(args) -> int:
    jobs = Jobs.connect(args.address, args.auth_token)
    rows = [j for j in jobs.call(jobs.client.list_jobs) if j.submission_id]
    rows.sort(key=lambda j: j.start_time or 0)
    if args.json:
        print(json.dumps([parts.details(j) for j in rows], indent=2))
        return 0
    table = [("JOB ID", "STATUS", "RUN", "STARTED")]
    table += [(j.submission_id, str(j.status.value), (j.metadata or {}).get("rayft_run", "-"),
               parts.clock(j.start_time)) for j in rows]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    if not rows:
        print(f"(no submitted jobs on {jobs.url})")
    return 0


def cmd_status(args) -> int:
    jobs = Jobs.connect(args.address, args.auth_token)
    info = jobs.call(jobs.client.get_job_info, args.job)
    if args.json:
        print(json.dumps(parts.details(info), indent=2))
        return 0
    meta = info.metadata or {}
    print(f"{args.job}: {info.status.value}")
    if info.message:
        print(f"message: {info.message}")
    if "rayft_run" in meta:
        print(f"run: {meta['rayft_run']} ({meta.get('rayft_method', '?')}) -> "
              f"{Path(meta.get('rayft_output_dir', '')) / meta['rayft_run']}")
    print(f"entrypoint: {info.entrypoint}")
    print(f"started: {parts.clock(info.start_time)}  ended: {parts.clock(info.end_time)}")
    if info.driver_exit_code is not None:
        print(f"exit code: {info.driver_exit_code}")
    return 0


def cmd_logs(args) -> int:
    jobs = Jobs.connect(args.address, args.auth_token)
    if args.follow:
        return jobs.follow(args.job)
    sys.stdout.write(jobs.call(jobs.client.get_job_logs, args.job))
    return 0


def cmd_stop(args) -> int:
    jobs = Jobs.connect(args.address, args.auth_token)
    if not jobs.call(jobs.client.stop_job, args.job):
        print(f"{args.job} is not running ({jobs.call(jobs.client.get_job_status, args.job).value})")
        return 0
    if args.no_wait:
        print(f"stop requested for {args.job}")
        return 0
    status = jobs.wait(args.job, timeout=args.timeout)
    print(f"{args.job}: {status.value}")
    return 0 if status.is_terminal() else 1


class Jobs:
    """A JobSubmissionClient, the URL it talks to, and one-line errors for what goes wrong."""

    def __init__(self, client, url: str):
        self.client, self.url = client, url

    @classmethod
    def connect(cls, address_flag: str | None, token_flag: str | None, config_address: str | None = None) -> "Jobs":
        from ray.exceptions import AuthenticationError

        address, source = parts.resolve_address(address_flag, config_address)
        token, token_source = parts.resolve_token(token_flag)
        url = _job_server_url(address, source, token)
        from ray.job_submission import JobSubmissionClient

        from services import ray_compat

        for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                     ray_compat.PACKAGING_LOGGER):
            logging.getLogger(name).setLevel(logging.WARNING)   # "Uploading package ..." and the like
        with parts.environ(drop=parts.ADDRESS_ENV):   # else Ray's SDK lets them override the URL
            try:
                client = JobSubmissionClient(url, headers=parts.auth_headers(token))
            except ConnectionError:
                raise UserError(f"cannot reach a Ray job server at {url} (address from {source}); give the "
                                "dashboard's URL (http://HEAD:8265) of a running cluster") from None
            except AuthenticationError as exc:
                raise UserError(parts.auth_error(str(exc), url, token_source)) from None
        return cls(client, url)

    def call(self, fn, *args, **kwargs):
        """fn(...), with what the user can fix (an unknown job id, a taken submission id, a
        working directory over Ray's size limit) as one-line UserErrors."""
        try:
            return fn(*args, **kwargs)
        except ValueError as exc:
            raise UserError(f"the job request failed: {str(exc).strip().splitlines()[0]}") from None
        except RuntimeError as exc:
            status = re.search(r"status code (\d+): (.*)", str(exc), re.S)
            if status and status.group(1) == "404" and args:
                raise UserError(f"no job '{args[0]}' on {self.url}") from None
            value_error = re.search(r"ValueError: (.*)", str(exc))   # a 500 with the server's traceback
            if status and (status.group(1).startswith("4") or value_error):
                reason = value_error.group(1) if value_error else status.group(2).strip().splitlines()[0]
                raise UserError(f"the job server at {self.url} refused: {reason.rstrip('.')}") from None
            raise

    def wait(self, job_id: str, timeout: float | None = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.call(self.client.get_job_status, job_id)
            if status.is_terminal() or (deadline is not None and time.monotonic() > deadline):
                return status
            time.sleep(POLL_S)

    def follow(self, job_id: str) -> int:
        """Stream the job's logs to stdout until it ends; 0 if it succeeded, 1 otherwise."""
        import asyncio

        async def tail():
            async for chunk in self.client.tail_job_logs(job_id):
                sys.stdout.write(chunk)
                sys.stdout.flush()

        self.call(self.client.get_job_status, job_id)   # an unknown id fails here, in one line
        try:
            asyncio.run(tail())
        except KeyboardInterrupt:
            print(f"\nstopped following; the job goes on (stop it: rayft jobs stop {job_id} --address {self.url})",
                  file=sys.stderr)
            return 130
        except (RuntimeError, OSError) as exc:
            print(f"rayft: the log stream broke ({exc}); waiting for the job to end", file=sys.stderr)
        info = self.call(self.client.get_job_info, job_id)
        if not info.status.is_terminal():
            self.wait(job_id)
            info = self.call(self.client.get_job_info, job_id)
        ok = info.status.value == "SUCCEEDED"
        print(f"job {job_id} {info.status.value}" + ("" if ok or not info.message else f": {info.message}"))
        return 0 if ok else 1


def _job_server_url(address: str, source: str, token: str | None) -> str:
    """The dashboard URL for `address`; 'auto', a GCS host:port or ray:// are looked up the
    way Ray's job CLI does (which contacts that cluster)."""
    kind = parts.address_kind(address)
    if kind == "http":
        return address.rstrip("/")
    if kind == "module":
        return address
    from ray.dashboard.utils import get_address_for_submission_client
    from ray.exceptions import RpcError

    from cluster.ray_env import use_token_auth_if_available
    from services import ray_compat

    if token:
        os.environ["RAY_AUTH_TOKEN"] = token   # the one resolved above, for the GCS lookup
    quiet = logging.getLogger(ray_compat.TOKEN_AUTH_LOGGER)
    quiet.setLevel(logging.ERROR)   # "Token authentication is enabled ...", said of the cluster it joins
    use_token_auth_if_available()
    with parts.environ(drop=parts.ADDRESS_ENV):
        try:
            return get_address_for_submission_client(address).rstrip("/")
        except (ConnectionError, ValueError, RuntimeError, RpcError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"cannot find the Ray cluster at '{address}' (from {source}): {first}") from None
