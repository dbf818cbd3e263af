"""Per-deployment credentials for NATS and etcd: generated at launch into the deployment's state directory (mode
0600: the shared filesystem's user permissions are the trust boundary, as for Slurm's own files), handed to each
step as a path (HPC_CREDENTIALS), never on a command line or in the environment's values.

- NATS: one user and password in the server's config file; a client without them cannot connect, so it can
  neither subscribe nor publish.
- etcd: authentication on; the deployment's user holds a role that reaches only /hpc/<deployment>/; the root
  user's password stays in the file for the operator.
Each deployment has its own servers and its own secrets, so one deployment's credentials open nothing of another."""

from __future__ import annotations

import base64
import json
import os
import secrets
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from hpc.errors import HpcError

ENV = "HPC_CREDENTIALS"


@dataclass(frozen=True)
class Credentials:
    nats_user: str
    nats_password: str
    etcd_user: str
    etcd_password: str
    etcd_root_password: str

    @classmethod
    def generate(cls, deployment: str) -> "Credentials":
        return cls(f"hpc-{deployment}", secrets.token_urlsafe(24), f"hpc-{deployment}", secrets.token_urlsafe(24),
                   secrets.token_urlsafe(24))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self), f)
        tmp.rename(path)

    @classmethod
    def load(cls, path: str | Path) -> "Credentials":
        path = Path(path)
        try:
            mode = path.stat().st_mode & 0o777
            data = json.loads(path.read_text())
            creds = cls(**data)
        except FileNotFoundError:
            raise HpcError(f"credentials file {path} not found (the head step writes it at launch)") from None
        except (OSError, ValueError, TypeError) as e:
            raise HpcError(f"credentials file {path} is unreadable: {e}") from None
        if mode & 0o077:
            raise HpcError(f"credentials file {path} is readable by others (mode {mode:o}); expected 600")
        return creds

    @classmethod
    def load_or_create(cls, path: Path, deployment: str) -> "Credentials":
        """The deployment's secrets: the existing ones (a restarted head keeps every client's credentials valid), or
        new ones."""
        if path.exists():
            return cls.load(path)
        creds = cls.generate(deployment)
        creds.save(path)
        return creds


def from_env(env: dict | None = None) -> Credentials | None:
    path = (env if env is not None else os.environ).get(ENV)
    return Credentials.load(path) if path else None


def nats_config(creds: Credentials | None) -> str:
    if creds is None:
        return ""
    return f'authorization {{\n  user: "{creds.nats_user}"\n  password: "{creds.nats_password}"\n}}\n'


# ---- etcd: users, a role per deployment prefix, authentication on (through etcd's JSON gateway) -----------------
def _prefix_end(prefix: str) -> str:
    """The end of the key range that holds every key starting with `prefix`."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def _post(url: str, path: str, body: dict, token: str | None = None, timeout: float = 5.0) -> dict:
    req = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **({"Authorization": token}
                                                                                 if token else {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:300]
        raise HpcError(f"etcd {path}: HTTP {e.code} {detail}") from None
    except OSError as e:
        raise HpcError(f"etcd {path}: {e}") from None


def enable_etcd_auth(url: str, creds: Credentials, deployment: str) -> None:
    """On a fresh etcd: a root user, the deployment's user with read-write on /hpc/<deployment>/ only, auth on.
    An etcd that already has auth on (restarted on its data directory) is left as it is."""
    prefix = f"/hpc/{deployment}/"
    try:
        _post(url, "/v3/auth/user/add", {"name": "root", "password": creds.etcd_root_password})
    except HpcError as e:
        if any(m in str(e) for m in ("user name already exists", "permission denied", "user name not found",
                                       "user name is empty")):
            return  # set up before: etcd restarted on its data directory keeps its users and auth
        raise
    _post(url, "/v3/auth/user/grant", {"user": "root", "role": "root"})
    _post(url, "/v3/auth/role/add", {"name": "deployment"})
    _post(url, "/v3/auth/role/grant", {"name": "deployment", "perm": {
        "permType": "READWRITE", "key": _b64(prefix), "range_end": _b64(_prefix_end(prefix))}})
    _post(url, "/v3/auth/user/add", {"name": creds.etcd_user, "password": creds.etcd_password})
    _post(url, "/v3/auth/user/grant", {"user": creds.etcd_user, "role": "deployment"})
    _post(url, "/v3/auth/enable", {})
