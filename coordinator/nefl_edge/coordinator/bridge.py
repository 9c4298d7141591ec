"""Brokers people run: a site broker bridged to the coordinator's broker (``nefl-coord site-broker-config``),
and the check that the broker carries messages of the run's chunk size (``serve`` does it before it starts).

Fleets spread over sites usually have a broker per site that the site's devices use, bridged to a central
broker. The site broker here is a full ``broker-config`` folder (TLS, passwords, the per-device ACL: devices
are enrolled with ``add-device --broker-dir SITE``) plus one Mosquitto bridge (``connection`` section, in
``bridge.d/bridge.conf``, 0600 because Mosquitto reads the bridge's password from it in clear) to the
coordinator's broker. The bridge carries exactly what the ACL lets devices and the coordinator exchange:

- out (site -> coordinator): ``nefl/+/node/+/{hello,status,update}/#``;
- in (coordinator -> site): ``nefl/+/node/+/task/#`` and the broadcasts ``nefl/+/{weights,artifact,manifest,
  control}/#``, so a round's weights cross the bridge once per site and the site broker fans them out.

What the protocol needs from the bridge, and how this configuration gives it (Mosquitto 2.0 manual,
mosquitto.conf(5), "Configuring Bridges"):

- **Retained messages** (manifest, artifacts, weights, the devices' statuses and Last Wills, all on
  ``<topic>/chunk/<i>``): ``try_private true`` (Mosquitto's default, said here explicitly) makes the bridge
  connect as a bridge, and a Mosquitto upstream then forwards messages with their retain flag as published,
  so the site broker keeps its own retained copy; on connect the bridge's subscription receives the
  upstream's retained messages (retain set). Clearing a retained chunk (an empty retained payload) crosses
  the same way. A device joining late at a site gets the manifest, artifacts and weights from the site
  broker's retained store (checked in ``tests/test_brokers.py``).
- **Persistent sessions**: a device's session (``clean_session false``, QoS 1) lives on the site broker and
  does not depend on the bridge. The bridge itself connects with ``cleansession false`` and a fixed client id,
  so the upstream queues QoS 1 messages for the site while the bridge is down and the site broker queues
  the other way (bounded by ``max_queued_messages``).
- **Loops**: the directions above never overlap, so nothing can come back across the bridge.

Departure from a plain ``topic nefl/# both 1``: narrower topics, so a site receives no device's hello,
status or update of another site, and cannot publish tasks or broadcasts upstream (the upstream ACL refuses
them too). Every site still receives every site's tasks (small); the ACL keeps a device to its own.

Security: against an upstream that is not on loopback the bridge runs over TLS (``bridge_cafile``: the
upstream's CA) with an account of its own (``nefl-site-<site>``), unless ``insecure``. With the upstream's
broker folder at hand (``upstream_dir``), the account is created there: a password entry and an ACL block,
recorded in ``bridges.json`` of that folder; reload the upstream broker afterwards.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import stat
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from nefl_edge.coordinator.broker_config import (
    BRIDGE_ACL_MARK,
    BROADCASTS,
    DEVICE_WRITES,
    BrokerConfigError,
    BrokerOptions,
    BrokerSettings,
    set_password,
    share_with_broker,
    write_broker_config,
)
from nefl_edge.core.errors import BadInput
from nefl_edge.core.identity import make_private_dir, write_atomic
from nefl_edge.core.mqtt import BrokerAddress, BrokerError, Security
from nefl_edge.core.wire import MAX_FRAME_HEADER_SIZE, MIN_CHUNK_SIZE

log = logging.getLogger(__name__)

SITE_PATTERN = r"^[A-Za-z0-9_-]{1,40}$"
BRIDGES_FILE = "bridges.json"
BRIDGE_CONF = Path("bridge.d") / "bridge.conf"


def bridge_user(site: str) -> str:
    """The upstream account (and MQTT client id) of a site's bridge."""
    return f"nefl-site-{site}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bridge_acl_text(users: Sequence[str], prefix: str = "nefl") -> str:
    """ACL blocks for bridge accounts: each writes what devices write and reads what devices read, for
    every node (a site's devices are only known to the site broker, whose ACL holds each to itself)."""
    lines = [BRIDGE_ACL_MARK]
    for user in users:
        lines += [
            f"user {user}",
            *(f"topic write {prefix}/+/node/+/{kind}/#" for kind in DEVICE_WRITES),
            f"topic read {prefix}/+/node/+/task/#",
            *(f"topic read {prefix}/+/{kind}/#" for kind in BROADCASTS),
        ]
    return "\n".join(lines) + "\n"


def bridge_users(upstream_dir: Path) -> List[str]:
    """The bridge accounts recorded in ``upstream_dir/bridges.json`` (none: empty)."""
    path = Path(upstream_dir) / BRIDGES_FILE
    if not path.exists():
        return []
    try:
        users = json.loads(path.read_text())["users"]
        if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
            raise ValueError("users is not a list of names")
        return list(users)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BrokerConfigError(f"{path} cannot be read ({exc}); delete it and run site-broker-config again") from None


def with_bridge_acl(acl: str, users: Sequence[str]) -> str:
    """``acl`` with its bridge block (if any) replaced by one for ``users``."""
    head = acl.split(BRIDGE_ACL_MARK, 1)[0].rstrip("\n") + "\n"
    return head + ("\n" + bridge_acl_text(users) if users else "")


def add_bridge_account(upstream_dir: Path, site: str) -> str:
    """Create (or renew) the bridge account of ``site`` in the coordinator's broker folder: a password entry,
    the ACL block, ``bridges.json``. Returns the new password; reload the upstream broker afterwards."""
    upstream = Path(upstream_dir)
    settings = BrokerSettings.load(upstream)  # refuses a folder that broker-config did not write
    user = bridge_user(site)
    password = secrets.token_urlsafe(32)
    set_password(settings.password_file, user, password)
    users = sorted({*bridge_users(upstream), user})
    write_atomic(upstream / BRIDGES_FILE, json.dumps({"users": users}, indent=1), 0o644)
    acl = upstream / "acl"
    write_atomic(acl, with_bridge_acl(acl.read_text() if acl.exists() else "", users), 0o644)
    return password


@dataclass
class SiteOptions:
    """What ``nefl-coord site-broker-config`` takes. ``broker``: the site broker's own listeners (as
    ``broker-config``); ``upstream``: HOST:PORT of the coordinator's broker; the bridge's TLS CA and account
    come from ``upstream_dir`` (the coordinator's broker folder) or from ``upstream_ca`` and
    ``password_file``."""

    site: str
    upstream: str
    broker: BrokerOptions
    upstream_dir: Optional[Path] = None
    upstream_ca: Optional[Path] = None
    password_file: Optional[Path] = None
    insecure: bool = False
    prefix: str = "nefl"
    keepalive_s: int = 30
    extra: Tuple[str, ...] = field(default_factory=tuple)


def parse_upstream(text: str) -> Tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BrokerConfigError(f"--upstream {text!r} must be HOST:PORT (the coordinator's broker)")
    return host.strip("[]"), int(port)


def bridge_text(opts: SiteOptions, home: Path, password: Optional[str], tls: bool, user: Optional[str]) -> str:
    """The ``connection`` section of the site broker's bridge (mosquitto.conf(5), "Configuring Bridges")."""
    host, port = parse_upstream(opts.upstream)
    p = opts.prefix
    lines = [
        "# generated by nefl-coord site-broker-config; Mosquitto 2.x bridge to the coordinator's broker",
        f"connection {bridge_user(opts.site)}",
        f"address {host}:{port}",
        f"remote_clientid {bridge_user(opts.site)}",
        "bridge_protocol_version mqttv311",
        "try_private true",  # bridge mode: the upstream keeps the retain flag of what it forwards to us
        "cleansession false",  # the upstream queues QoS 1 messages for the site while the bridge is down
        "notifications false",  # no $SYS/broker/connection/... on the upstream (its ACL refuses them)
        "start_type automatic",
        "restart_timeout 2 30",
        f"keepalive_interval {opts.keepalive_s}",
    ]
    if user is not None:
        lines.append(f"remote_username {user}")
    if password is not None:
        lines.append(f"remote_password {password}")
    if tls:
        lines += [f"bridge_cafile {home / 'upstream-ca.crt'}", "bridge_tls_version tlsv1.2", "bridge_insecure false"]
    lines += [f"topic {p}/+/node/+/{kind}/# out 1" for kind in DEVICE_WRITES]
    lines += [f"topic {p}/+/node/+/task/# in 1", *(f"topic {p}/+/{kind}/# in 1" for kind in BROADCASTS)]
    lines += list(opts.extra)
    return "\n".join(lines) + "\n"


def write_site_config(opts: SiteOptions) -> BrokerSettings:
    """Write the site broker's folder: ``broker-config``'s files, ``bridge.d/bridge.conf`` (0600) included by
    ``mosquitto.conf``, and ``upstream-ca.crt``. With ``upstream_dir`` also create the bridge account there."""
    if not re.match(SITE_PATTERN, opts.site):
        raise BrokerConfigError(f"site name {opts.site!r} must be 1-40 letters, digits, '_' or '-'")
    host, _ = parse_upstream(opts.upstream)
    if opts.upstream_dir is not None and (opts.upstream_ca is not None or opts.password_file is not None):
        raise BrokerConfigError("give --upstream-dir, or --upstream-ca and --bridge-password-file, not both")
    ca = opts.upstream_ca
    if opts.upstream_dir is not None:
        ca = Path(opts.upstream_dir) / "ca.crt"
    tls = ca is not None
    needs_account = opts.upstream_dir is None and opts.password_file is None
    if not is_loopback(host) and not opts.insecure and (not tls or needs_account):
        raise BrokerConfigError(
            f"the upstream {host} is not on loopback: the bridge needs TLS and an account (--upstream-dir, or "
            "--upstream-ca and --bridge-password-file), or --insecure for a plain, anonymous bridge"
        )
    for path in (ca, opts.password_file):
        if path is not None and not Path(path).is_file():
            raise BrokerConfigError(f"file {path} does not exist")
    broker = dataclasses.replace(opts.broker)
    home = Path(broker.install_dir) if broker.install_dir else Path(broker.out).resolve()
    include = f"include_dir {home / BRIDGE_CONF.parent}"
    broker.extra = (*broker.extra, "", include)
    settings = write_broker_config(broker)
    out = Path(broker.out)
    password: Optional[str] = None
    user: Optional[str] = None
    if opts.upstream_dir is not None:
        user, password = bridge_user(opts.site), add_bridge_account(Path(opts.upstream_dir), opts.site)
    elif opts.password_file is not None:
        user, password = bridge_user(opts.site), Path(opts.password_file).read_text().strip()
    if ca is not None:
        shutil.copyfile(ca, out / "upstream-ca.crt")
    folder = make_private_dir(out / BRIDGE_CONF.parent)
    write_atomic(out / BRIDGE_CONF, bridge_text(opts, home, password, tls, user), 0o600)
    group = out.stat().st_gid
    if group != os.getegid() and out.stat().st_mode & stat.S_IRGRP:  # handed to the broker's user (broker_config)
        os.chown(folder, -1, group)
        os.chmod(folder, 0o750)
        share_with_broker(out / BRIDGE_CONF)
    record = json.loads((out / "broker.json").read_text())
    record["site"] = {"name": opts.site, "upstream": opts.upstream, "bridge_user": user, "tls": tls}
    write_atomic(out / "broker.json", json.dumps(record, indent=1), 0o644)
    return settings


# --- does the broker carry our chunks? ---------------------------------------------------------------------

FRAME_OVERHEAD = 8 + MAX_FRAME_HEADER_SIZE  # b"NFLC", the header length and the frame header at its largest
PACKET_ALLOWANCE = 512  # MQTT fixed header, packet id, MQTT 5 properties and the longest topic we publish on
PROBE_SIZES = (1 << 20, 512 << 10, 256 << 10, 128 << 10, 64 << 10, 32 << 10, 16 << 10, 8 << 10)


class ChunkTooLarge(BadInput):
    """The broker refuses MQTT packets as large as the run's chunks; the message says what to pass."""


def packet_size(chunk_size: int) -> int:
    """An upper bound of the MQTT packet that carries one frame of ``chunk_size`` bytes."""
    return chunk_size + FRAME_OVERHEAD + PACKET_ALLOWANCE


def chunk_size_for(packet_limit: int) -> int:
    """The largest chunk size (whole KiB) whose packets fit a broker's ``packet_limit``."""
    return max(MIN_CHUNK_SIZE, (packet_limit - FRAME_OVERHEAD - PACKET_ALLOWANCE) // 1024 * 1024)


class _Probe:
    """One short-lived connection that publishes a packet of a given size at QoS 1 and says whether the
    broker acknowledged it (True), closed the connection on it (False), or neither within the time."""

    def __init__(self, broker: BrokerAddress, security: Security, protocol: str, timeout_s: float) -> None:
        version = mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311
        kwargs: Dict[str, Any] = {"client_id": f"nefl-probe-{uuid.uuid4().hex[:8]}", "protocol": version}
        if version == mqtt.MQTTv311:
            kwargs["clean_session"] = True
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, **kwargs)
        security.apply(self.client)
        self.broker, self.timeout_s, self.version = broker, timeout_s, version
        self.connected, self.closed = threading.Event(), threading.Event()
        self.refused: Optional[str] = None
        self.max_packet: Optional[int] = None
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *args: self.closed.set()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self.refused = str(reason)
        elif props is not None and hasattr(props, "MaximumPacketSize"):
            self.max_packet = int(props.MaximumPacketSize)
        self.connected.set()

    def __enter__(self) -> _Probe:
        props = None
        if self.version == mqtt.MQTTv5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 0
        try:
            if props is not None:
                self.client.connect_async(self.broker.host, self.broker.port, 30, clean_start=True, properties=props)
            else:
                self.client.connect_async(self.broker.host, self.broker.port, 30)
        except (OSError, ValueError) as exc:
            raise BrokerError(f"cannot connect to broker {self.broker}: {exc}") from None
        self.client.loop_start()
        if not self.connected.wait(self.timeout_s) or self.refused:
            self.client.loop_stop()
            raise BrokerError(
                f"cannot connect to MQTT broker {self.broker}: {self.refused or 'no answer'}. Check that the broker "
                "runs and listens there, and the --tls-* / --username / --password-file options."
            )
        return self

    def carries(self, topic: str, size: int) -> Optional[bool]:
        info = self.client.publish(topic, bytes(size), qos=1)
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if info.is_published():
                return True
            if self.closed.wait(0.02):
                return False
        return None

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def check_chunk_size(
    broker: str,
    security: Security,
    chunk_size: int,
    run: str,
    protocol: str = "3.1.1",
    timeout_s: float = 10.0,
) -> None:
    """Refuse, before a run starts, a ``chunk_size`` whose packets the broker would not take.

    A broker with a packet limit (Mosquitto's ``max_packet_size``, cloud IoT brokers' 128 KiB) closes the
    connection of a client that publishes a larger packet; the link would reconnect, publish the same chunk
    and be dropped again, for ever. Over MQTT 5 the broker states its limit in CONNACK (Maximum Packet Size,
    MQTT 5.0 section 3.2.2.3.6); over 3.1.1 one QoS 1 packet of the largest frame's size goes to
    ``nefl/<run>/flush`` (a topic nobody reads; the link waits for its acknowledgements there) and a
    closed connection means too large. The smaller sizes are then tried to say what would fit; when none
    passes, the refusal is not about size (a broker that drops clients for a publish it does not permit,
    as some cloud brokers do): a warning, and the run goes on.

    Not detected: a broker that acknowledges and drops an oversized message (Mosquitto's deprecated
    ``message_size_limit`` does so over 3.1.1): only a round trip would show it, and the generated ACL lets
    no account read what it writes."""
    address = BrokerAddress.parse(broker, 8883 if security.tls_ca else 1883)
    topic, wanted = f"nefl/{run}/flush", packet_size(chunk_size)
    with _Probe(address, security, protocol, timeout_s) as probe:
        limit = probe.max_packet
        if limit is None:
            if probe.carries(topic, wanted - PACKET_ALLOWANCE) is not False:
                return
        elif wanted <= limit:
            return
    said = f"its limit is {limit} bytes"
    if limit is None:
        for size in (s for s in PROBE_SIZES if s < wanted):
            with _Probe(address, security, protocol, timeout_s) as probe:
                if probe.carries(topic, size - PACKET_ALLOWANCE):
                    limit, said = size, f"it took a packet of {size} bytes"
                    break
        else:
            log.warning(
                "the broker %s closed the connection on a publish to %s of every size tried (%d bytes down to "
                "%d): not a size limit, or not one this check can see; going on",
                address, topic, wanted, PROBE_SIZES[-1],
            )  # fmt: skip
            return
    raise ChunkTooLarge(
        f"the broker {address} refuses MQTT packets of {wanted} bytes, which --chunk-size {chunk_size} makes "
        f"({said}); pass --chunk-size {chunk_size_for(limit)} to serve and the same --max-message-size to "
        "the devices"
    )
