"""Push the layrot Grafana dashboards to a Grafana server, and read their queries.

`push_dashboards` uses grafana-client (the `layrot[grafana]` extra) to create the
target folder if it is missing and create or overwrite each dashboard in it by
uid, so running it twice changes nothing but the dashboards' version.
`grafana_group` is the `layrot-agent grafana` click group (`grafana push`).

`panel_exprs` lists the PromQL of a dashboard's panels with template variables
filled in the way Grafana's Prometheus data source fills them; tests use it to
check every query against a real Prometheus.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from layrot.cli.cli_common import CONTEXT_SETTINGS

logger = logging.getLogger(__name__)

DEFAULT_FOLDER = "layrot"
PUSH_MESSAGE = "layrot-agent grafana push"

# Values Grafana gives its built-in variables; callers may override any of them.
BUILTIN_VARIABLES: dict[str, str] = {
    "__rate_interval": "1m",
    "__interval": "30s",
    "__interval_ms": "30000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
}

_VARIABLE = re.compile(r"\$\{(\w+)(?::[\w]+)?\}|\[\[(\w+)(?::[\w]+)?\]\]|\$(\w+)")
_REGEX_SPECIAL = re.compile(r"[$^*{}\[\]'+?.()|]")


class GrafanaPushError(Exception):
    """A push failed; the message is one line meant for the user."""


# ----------------------------------------------------------------------------- dashboards on disk


def default_dashboards_dir() -> Path:
    """The dashboards shipped with layrot (``deploy/grafana/dashboards``, package data of ``layrot.deploy``)."""
    from importlib.resources import files

    return Path(str(files("layrot.deploy") / "grafana" / "dashboards"))


def load_dashboards(dashboards_dir: str | Path | None = None) -> list[tuple[Path, dict]]:
    """(path, dashboard model) for every *.json in the directory, sorted by file name.

    Accepts plain dashboard models and `{"dashboard": {...}}` wrappers (Grafana's
    export and API format). Raises GrafanaPushError on unreadable files, missing
    uid/title, or two files sharing a uid.
    """
    directory = Path(dashboards_dir) if dashboards_dir is not None else default_dashboards_dir()
    if not directory.is_dir():
        hint = "" if dashboards_dir is not None else " (it ships with the layrot source: pass --dir PATH)"
        raise GrafanaPushError(f"dashboards directory not found: {directory}{hint}")
    found: list[tuple[Path, dict]] = []
    seen: dict[str, Path] = {}
    for path in sorted(directory.glob("*.json")):
        try:
            model = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise GrafanaPushError(f"cannot read dashboard {path}: {exc}") from None
        if isinstance(model, dict) and "dashboard" in model and "panels" not in model:
            model = model["dashboard"]
        if not isinstance(model, dict) or not model.get("uid") or not model.get("title"):
            raise GrafanaPushError(f"{path} is not a Grafana dashboard with a uid and a title")
        uid = model["uid"]
        if uid in seen:
            raise GrafanaPushError(f"{path} and {seen[uid]} both use dashboard uid {uid!r}")
        seen[uid] = path
        found.append((path, model))
    if not found:
        raise GrafanaPushError(f"no *.json dashboards in {directory}")
    return found


def folder_uid(title: str) -> str:
    """A stable folder uid derived from its title (Grafana allows 40 chars of [A-Za-z0-9_-])."""
    uid = re.sub(r"[^a-z0-9_-]+", "-", title.strip().lower()).strip("-")[:40]
    if not uid:
        raise GrafanaPushError(f"folder name {title!r} has no usable characters")
    return uid


# ----------------------------------------------------------------------------- push


def _connect(url: str, token: str | None, verify: bool, timeout: float):
    try:
        from grafana_client import GrafanaApi
    except ImportError:
        raise GrafanaPushError("grafana push needs grafana-client: pip install 'layrot[grafana]'") from None
    from layrot.client.http_query import split_http_url

    try:
        parsed, port = split_http_url(url, "Grafana URL")
    except ValueError as exc:
        raise GrafanaPushError(str(exc)) from None
    # grafana-client appends "api" to the prefix verbatim: it needs a trailing slash.
    prefix = parsed.path.strip("/")
    prefix = prefix + "/" if prefix else ""
    if token:
        auth: Any = token
    elif parsed.username:
        auth = (parsed.username, parsed.password or "")
    else:
        auth = None
    return GrafanaApi(
        auth=auth,
        host=parsed.hostname,
        port=port,
        protocol=parsed.scheme,
        url_path_prefix=prefix,
        verify=verify,
        timeout=timeout,
    )


def _describe(exc: BaseException, url: str, what: str) -> GrafanaPushError:
    """Turn a grafana-client / HTTP exception into a one-line error."""
    from grafana_client.client import GrafanaException, GrafanaTimeoutError

    if isinstance(exc, GrafanaTimeoutError):
        return GrafanaPushError(f"Grafana at {url} timed out while {what}")
    if isinstance(exc, GrafanaException):
        status = exc.status_code
        body = exc.response
        message = body.get("message") if isinstance(body, dict) else (str(body).strip() if body else "")
        message = " ".join(str(message or exc.message).split())
        if status == 401:
            return GrafanaPushError(
                f"Grafana at {url} rejected the credentials (HTTP 401: {message}) while {what}: "
                "check --token / LAYROT_GRAFANA_TOKEN"
            )
        if status == 403:
            return GrafanaPushError(
                f"Grafana at {url} denied access (HTTP 403: {message}) while {what}: the token needs "
                "the Editor role (folders:create, dashboards:write)"
            )
        if status == 0:
            return GrafanaPushError(f"cannot reach Grafana at {url} while {what}: {message}")
        return GrafanaPushError(f"Grafana at {url} answered HTTP {status} while {what}: {message}")
    text = " ".join(str(exc).split())
    # urllib3-style errors bury the cause ("[Errno 111] Connection refused") in a long repr.
    errno = re.search(r"\[Errno -?\d+\][^'\")]*", text)
    reason = errno.group(0).strip() if errno else (text[:200] or type(exc).__name__)
    return GrafanaPushError(f"cannot reach Grafana at {url} while {what}: {reason}")


def _call(url: str, what: str, fn, *args, **kwargs):
    import niquests.exceptions
    from grafana_client.client import GrafanaException

    try:
        return fn(*args, **kwargs)
    except (GrafanaException, niquests.exceptions.RequestException, OSError) as exc:
        raise _describe(exc, url, what) from None


def _ensure_folder(api, url: str, title: str) -> dict:
    from grafana_client.client import GrafanaClientError

    uid = folder_uid(title)
    try:
        found = api.folder.get_folder(uid)
        return {"kind": "folder", "action": "exists", "uid": found.get("uid", uid), "title": found.get("title", title)}
    except GrafanaClientError as exc:
        if exc.status_code != 404:
            raise _describe(exc, url, f"looking up folder {uid!r}") from None
    except Exception as exc:  # connection errors and the like
        raise _describe(exc, url, f"looking up folder {uid!r}") from None
    # A folder made by hand (or by provisioning) under another uid: reuse it.
    for folder in _call(url, "listing folders", api.folder.get_all_folders) or []:
        if isinstance(folder, dict) and folder.get("title") == title and folder.get("uid"):
            return {"kind": "folder", "action": "exists", "uid": folder["uid"], "title": title}
    try:
        created = api.folder.create_folder(title, uid=uid)
    except GrafanaClientError as exc:
        if exc.status_code not in (409, 412):
            raise _describe(exc, url, f"creating folder {title!r}") from None
        # Someone created it between our lookup and our create.
        created = _call(url, f"looking up folder {uid!r}", api.folder.get_folder, uid)
        return {"kind": "folder", "action": "exists", "uid": created.get("uid", uid), "title": title}
    except Exception as exc:
        raise _describe(exc, url, f"creating folder {title!r}") from None
    logger.info("created Grafana folder %r (uid %s)", title, created.get("uid", uid))
    return {"kind": "folder", "action": "created", "uid": created.get("uid", uid), "title": title}


def push_dashboards(
    url: str,
    token: str | None,
    folder: str = DEFAULT_FOLDER,
    dashboards_dir: str | Path | None = None,
    overwrite: bool = True,
    verify: bool = True,
    timeout: float = 10.0,
) -> list[dict]:
    """Create or update the layrot dashboards in a Grafana folder.

    url: Grafana's base URL (http(s)://host:port[/subpath]); token: a service
    account token sent as `Authorization: Bearer ...` (None: use credentials in
    the URL, if any). The folder is found by uid (derived from its name) or title
    and created if missing. Each dashboard is saved by uid with `overwrite`; with
    overwrite=False an existing dashboard is left alone ("skipped"). verify: check
    the server's TLS certificate.

    Returns one dict per action, the folder first:
    {"kind": "folder", "action": "created"|"exists", "uid", "title"} then
    {"kind": "dashboard", "action": "created"|"updated"|"skipped", "uid", "title",
    "version", "url", "file"}. Raises GrafanaPushError with a one-line message.
    """
    dashboards = load_dashboards(dashboards_dir)
    api = _connect(url, token, verify, timeout)
    from grafana_client.client import GrafanaClientError

    folder_info = _ensure_folder(api, url, folder)
    done = [folder_info]
    base = url.rstrip("/")
    for path, model in dashboards:
        body = dict(model)
        # Ids are per-instance; version is Grafana's to manage. The uid identifies it.
        body["id"] = None
        body.pop("version", None)
        payload = {"dashboard": body, "folderUid": folder_info["uid"], "overwrite": overwrite, "message": PUSH_MESSAGE}
        what = f"saving dashboard {model['uid']!r}"
        try:
            resp = api.dashboard.update_dashboard(payload)
        except GrafanaClientError as exc:
            if exc.status_code == 412 and not overwrite:
                done.append(
                    {
                        "kind": "dashboard",
                        "action": "skipped",
                        "uid": model["uid"],
                        "title": model["title"],
                        "version": None,
                        "url": None,
                        "file": str(path),
                    }
                )
                continue
            raise _describe(exc, url, what) from None
        except Exception as exc:
            raise _describe(exc, url, what) from None
        if not isinstance(resp, dict) or resp.get("status") != "success":
            raise GrafanaPushError(f"Grafana at {url} did not confirm {what}: {resp!r}")
        version = resp.get("version")
        rel = resp.get("url") or f"/d/{model['uid']}"
        done.append(
            {
                "kind": "dashboard",
                "action": "created" if version == 1 else "updated",
                "uid": resp.get("uid", model["uid"]),
                "title": model["title"],
                "version": version,
                "url": base + rel if rel.startswith("/") else rel,
                "file": str(path),
            }
        )
        logger.info("saved Grafana dashboard %s (version %s)", model["uid"], version)
    return done


# ----------------------------------------------------------------------------- queries


def _walk_panels(panels: Sequence[Mapping]) -> Iterator[Mapping]:
    for p in panels or ():
        yield p
        # Collapsed rows keep their panels inside the row.
        yield from _walk_panels(p.get("panels") or ())


def _regex_escape(value: str) -> str:
    # Grafana's prometheusSpecialRegexEscape: the backslash is doubled because
    # the value lands inside a PromQL string literal.
    return _REGEX_SPECIAL.sub(lambda m: "\\\\" + m.group(0), value.replace("\\", "\\\\\\\\"))


def interpolate(expr: str, variables: Mapping[str, str | Sequence[str]]) -> str:
    """Fill `$var`, `${var}`, `${var:fmt}` and `[[var]]` as Grafana's Prometheus data source does.

    A str value is used as is (a single-value variable, or an "All" value such as
    ".*"); a list is a multi-value selection: each value regex-escaped, joined as
    (a|b). Grafana's built-ins ($__rate_interval, $__range, ...) default to
    BUILTIN_VARIABLES. An unknown variable raises KeyError.
    """
    values = {**BUILTIN_VARIABLES, **variables}

    def fill(match: re.Match) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        if name not in values:
            raise KeyError(f"dashboard query uses ${name}, which has no value: {expr}")
        value = values[name]
        if isinstance(value, str):
            return value.replace("\\", "\\\\")
        escaped = [_regex_escape(str(v)) for v in value]
        return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"

    return _VARIABLE.sub(fill, expr)


def panel_exprs(
    dashboard: Mapping, variables: Mapping[str, str | Sequence[str]], include_annotations: bool = False
) -> list[str]:
    """The PromQL of every panel target of a dashboard, variables filled in.

    Panels in collapsed rows are included, targets without an `expr` (or hidden
    ones) are not. include_annotations adds the dashboard's Prometheus annotation
    queries, which may rightly return nothing.
    """
    out = []
    for p in _walk_panels(dashboard.get("panels", ())):
        for t in p.get("targets") or ():
            if t.get("expr") and not t.get("hide"):
                out.append(interpolate(t["expr"], variables))
    if include_annotations:
        for a in (dashboard.get("annotations") or {}).get("list", ()):
            if a.get("expr"):
                out.append(interpolate(a["expr"], variables))
    return out


# ----------------------------------------------------------------------------- CLI


@click.group("grafana", context_settings=CONTEXT_SETTINGS)
def grafana_group() -> None:
    """Grafana dashboards for layrot: push the bundled dashboards to a Grafana server.

    Needs grafana-client (pip install 'layrot[grafana]'). The dashboards read the
    collector's Prometheus metrics (a Prometheus data source scraping /metrics).

    \b
    Examples:
      layrot-agent grafana push --url http://localhost:3000 --token glsa_xxx
      LAYROT_GRAFANA_URL=http://admin:admin@grafana:3000 layrot-agent grafana push --json
    """


@grafana_group.command("push", context_settings=CONTEXT_SETTINGS)
@click.option(
    "--url",
    envvar="LAYROT_GRAFANA_URL",
    required=True,
    show_envvar=True,
    help="Grafana base URL, e.g. http://localhost:3000",
)
@click.option(
    "--token",
    envvar="LAYROT_GRAFANA_TOKEN",
    default=None,
    show_envvar=True,
    help="Service account token (Editor role). Omit to use user:password in the URL.",
)
@click.option("--folder", default=DEFAULT_FOLDER, show_default=True, help="Folder to put the dashboards in.")
@click.option(
    "--dir",
    "dashboards_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory of dashboard JSON files [default: the layrot dashboards].",
)
@click.option("--no-overwrite", is_flag=True, help="Leave dashboards that already exist untouched.")
@click.option("--insecure", is_flag=True, help="Do not verify the server's TLS certificate.")
@click.option("--json", "as_json", is_flag=True, help="Print what was done as JSON.")
def push_command(
    url: str,
    token: str | None,
    folder: str,
    dashboards_dir: Path | None,
    no_overwrite: bool,
    insecure: bool,
    as_json: bool,
) -> None:
    """Create or update the layrot dashboards in Grafana (idempotent).

    Creates the folder if needed and saves every dashboard JSON of --dir (default:
    the dashboards shipped in the package, deploy/grafana/dashboards), overwriting
    older versions unless --no-overwrite.

    \b
    Examples:
      layrot-agent grafana push --url http://localhost:3000 --token glsa_xxx
      layrot-agent grafana push --url http://admin:admin@localhost:3000 --folder ML --no-overwrite
      layrot-agent grafana push --url https://grafana.example.org --dir ./my-dashboards --json
    """
    try:
        done = push_dashboards(
            url, token, folder=folder, dashboards_dir=dashboards_dir, overwrite=not no_overwrite, verify=not insecure
        )
    except GrafanaPushError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(done, indent=2))
        return
    for item in done:
        if item["kind"] == "folder":
            click.echo(f"folder {item['title']!r} (uid {item['uid']}): {item['action']}")
        elif item["action"] == "skipped":
            click.echo(f"dashboard {item['uid']}: exists, skipped")
        else:
            click.echo(f"dashboard {item['uid']}: {item['action']} (version {item['version']}) {item['url']}")
