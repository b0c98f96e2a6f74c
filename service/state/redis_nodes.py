"""How the Redis store reaches its Redis: one server (standalone, or a Sentinel's current master),
or a Cluster's masters.

The store's operations are written once, as scripts and reads over a list of keys whose results
are per key. `Standalone` runs each as one command; `Cluster` splits the keys by hash slot (a
command may only name keys of one slot), sends each master its commands as one pipeline, all
masters at once, and answers in the keys' order:

- MOVED: the slot map is read again (CLUSTER SLOTS from any known node) and the command resent
  to the slot's new master;
- ASK (a slot being migrated, the key already gone): the command is resent to the target node,
  preceded by ASKING;
- TRYAGAIN (a multi-key command on a slot half migrated) and CLUSTERDOWN: resent after a
  millisecond or two;
- NOSCRIPT (a restarted or failed-over master has lost its script cache): the script is loaded
  on that node and the command resent.

At most REDIRECTS rounds; a command still failing then, or a node that cannot be reached within
the timeout, fails the whole call (StateStoreUnavailableError): the batch is answered by the
fallback rules, and the next call reads the slot map again. A command's keys are always
declared (no script reaches a key it was not given, apart from a row's hold, which shares the
row's hash tag and so its slot), so Redis itself refuses a command sent to the wrong node rather
than running it on a stale copy.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import hiredis
import redis
from redis.commands.core import Script
from redis.crc import key_slot
from redis.exceptions import AskError, ClusterDownError, MovedError, NoScriptError, TryAgainError

from core.errors import StateStoreUnavailableError

REDIRECTS = 5
ASKING = b"*1\r\n$6\r\nASKING\r\n"
TRYAGAIN_SLEEP_S = 0.002

# One command: a script (its keys and arguments) or a plain command's arguments.
ArgsFor = Callable[[Sequence[int]], list[Any]]


def resp(args: Sequence[Any]) -> bytes:
    """One command in Redis's wire format (RESP), by hiredis's C packer: redis-py's own wrapper
    around it costs a few µs a command in Python, which a Cluster's hundreds of small commands a
    batch would otherwise spend most of their time in."""
    return bytes(hiredis.pack_command(tuple(args)))


def unavailable(exc: redis.RedisError) -> StateStoreUnavailableError:
    """Redis's failure, naming the class only (a server's error text may quote a key)."""
    return StateStoreUnavailableError(f"Redis {exc.__class__.__name__}")


class Standalone:
    """One Redis server: every call is one command."""

    atomic = True  # one script sees every key of a call: rows and records commit together

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def register(self, text: str) -> Script:
        return self.client.register_script(text)

    def script(self, script: Script, keys: list[bytes], args_for: ArgsFor) -> list[tuple[Sequence[int], Any]]:
        """`script` on all of `keys` in one call: [(the keys' indices, its reply)]."""
        everything = range(len(keys))
        try:
            return [(everything, script(keys=keys, args=args_for(everything)))]
        except redis.RedisError as exc:
            raise unavailable(exc) from exc

    def get(self, keys: list[bytes]) -> list[bytes | None]:
        try:
            found: list[bytes | None] = self.client.mget(keys) if keys else []  # type: ignore[assignment]
            return found
        except redis.RedisError as exc:
            raise unavailable(exc) from exc

    def script_and_get(self, script: Script, keys: list[bytes], args_for: ArgsFor,
                       names: list[bytes]) -> tuple[list[tuple[Sequence[int], Any]], list[bytes | None]]:
        """`script` on `keys` and an MGET of `names`, sent together: one round trip. (Not redis-py's
        pipeline: with a script in it, it asks SCRIPT EXISTS first, a round trip of its own.)"""
        everything = range(len(keys))
        args = args_for(everything)
        wire = resp(["EVALSHA", script.sha, len(keys), *keys, *args]) + (resp(["MGET", *names]) if names else b"")
        pool = self.client.connection_pool
        connection: Any = None
        reply: Any = None
        error: redis.RedisError | None = None
        try:
            connection = pool.get_connection()
            connection.send_packed_command([wire])
            try:
                reply = connection.read_response(disable_decoding=True)
            except NoScriptError:  # a restarted Redis: loaded, and the script sent again below
                reply = None
            except redis.ResponseError as exc:  # the MGET's reply is still to be read
                error = exc
            values: list[bytes | None] = connection.read_response(disable_decoding=True) if names else []
        except redis.RedisError as exc:
            if connection is not None:
                connection.disconnect()
            raise unavailable(exc) from exc
        finally:
            if connection is not None:
                pool.release(connection)
        if error is not None:
            raise unavailable(error) from error
        if reply is None:
            return self.script(script, keys, args_for), values
        return [(everything, reply)], values

    def set(self, entries: Sequence[tuple[bytes, bytes]], ttl_ms: int) -> None:
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for key, value in entries:
                    pipe.set(key, value, px=ttl_ms)
                pipe.execute()
        except redis.RedisError as exc:
            raise unavailable(exc) from exc


class _Command:
    __slots__ = ("args", "asking", "index", "node", "reply", "script", "slot")

    def __init__(self, index: int, slot: int, args: list[Any], script: Script | None) -> None:
        self.index, self.slot, self.args, self.script = index, slot, args, script
        self.node: tuple[str, int] | None = None
        self.asking = False
        self.reply: Any = None


class Cluster:
    """A Redis Cluster's masters, one pipeline each per call (see the module's docstring)."""

    atomic = False  # a call's keys lie on several masters: no one script sees them all

    def __init__(self, startup: Sequence[tuple[str, int]], **connection: Any) -> None:
        if not startup:
            raise ValueError("a Redis Cluster URL needs at least one host:port")
        self._startup = list(startup)
        self._connection = connection
        self._clients: dict[tuple[str, int], redis.Redis] = {}
        self._slots: list[tuple[str, int] | None] = [None] * 16384
        self._stale = True
        self._lock = threading.Lock()  # the slot map and the clients, shared by the pipeline's threads

    def register(self, text: str) -> Script:
        """The script's text and SHA1 (sent by `script`, loaded on a node that lacks it)."""
        return Script(self.client(self._startup[0]), text)

    def client(self, node: tuple[str, int]) -> redis.Redis:
        with self._lock:
            found = self._clients.get(node)
            if found is None:
                found = self._clients[node] = redis.Redis(host=node[0], port=node[1], **self._connection)
            return found

    def masters(self) -> list[tuple[str, int]]:
        """Every master serving slots (the slot map read now if stale)."""
        self._refresh_if_stale()
        return sorted({node for node in self._slots if node is not None})

    def refresh(self) -> None:
        """Read the slot map from the first known node that answers CLUSTER SLOTS."""
        known = list(dict.fromkeys([*self._startup, *self._clients]))
        last: redis.RedisError | None = None
        for node in known:
            try:
                client: Any = self.client(node)
                ranges = client.execute_command("CLUSTER SLOTS")
            except redis.RedisError as exc:
                last = exc
                continue
            slots: list[tuple[str, int] | None] = [None] * 16384
            for first, last_slot, master, *_replicas in ranges:
                host = master[0].decode() if isinstance(master[0], bytes) else master[0]
                address = (host or node[0], int(master[1]))
                slots[first:last_slot + 1] = [address] * (last_slot - first + 1)
            with self._lock:
                self._slots = slots
                self._stale = False
            return
        assert last is not None
        raise unavailable(last) from last

    def _refresh_if_stale(self) -> None:
        if self._stale:
            self.refresh()

    @staticmethod
    def _by_slot(keys: list[bytes]) -> dict[int, list[int]]:
        groups: dict[int, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(key_slot(key), []).append(i)
        return groups

    def script(self, script: Script, keys: list[bytes], args_for: ArgsFor) -> list[tuple[Sequence[int], Any]]:
        """`script` once per hash slot of `keys`: [(that slot's key indices, its reply)]."""
        groups, commands = self._per_slot(script, keys, args_for)
        self._run(commands)
        return [(idx, command.reply) for idx, command in zip(groups, commands, strict=True)]

    def _per_slot(self, script: Script, keys: list[bytes], args_for: ArgsFor) -> tuple[list[list[int]], list[_Command]]:
        groups = list(self._by_slot(keys).items())
        return [idx for _, idx in groups], [
            _Command(k, slot, ["EVALSHA", script.sha, len(idx), *(keys[i] for i in idx), *args_for(idx)], script)
            for k, (slot, idx) in enumerate(groups)]

    def get(self, keys: list[bytes]) -> list[bytes | None]:
        commands = [_Command(i, key_slot(key), ["GET", key], None) for i, key in enumerate(keys)]
        self._run(commands)
        return [command.reply for command in commands]

    def script_and_get(self, script: Script, keys: list[bytes], args_for: ArgsFor,
                       names: list[bytes]) -> tuple[list[tuple[Sequence[int], Any]], list[bytes | None]]:
        """`script` per slot of `keys` and a GET of each of `names`: one pipeline per master, at once."""
        groups, scripts = self._per_slot(script, keys, args_for)
        reads = [_Command(i, key_slot(name), ["GET", name], None) for i, name in enumerate(names)]
        self._run(scripts + reads)
        return ([(idx, command.reply) for idx, command in zip(groups, scripts, strict=True)],
                [command.reply for command in reads])

    def set(self, entries: Sequence[tuple[bytes, bytes]], ttl_ms: int) -> None:
        self._run([_Command(i, key_slot(key), ["SET", key, value, "PX", ttl_ms], None)
                   for i, (key, value) in enumerate(entries)])

    def _run(self, commands: list[_Command]) -> None:
        """Every command answered (its `reply` set), following redirections; or
        StateStoreUnavailableError."""
        self._refresh_if_stale()
        for command in commands:
            command.node = self._slots[command.slot]
        pending = commands
        for _ in range(REDIRECTS):
            unrouted = [c for c in pending if c.node is None]
            if unrouted:  # a slot no master serves (a shard down, the map mid-change)
                self._stale = True
                raise StateStoreUnavailableError(f"Redis Cluster: hash slot {unrouted[0].slot} is not served")
            pending = self._round(pending)
            if not pending:
                return
        self._stale = True
        raise StateStoreUnavailableError(f"Redis Cluster: {len(pending)} commands still redirected after "
                                         f"{REDIRECTS} rounds")

    def _round(self, commands: list[_Command]) -> list[_Command]:
        """Send each node its commands, all nodes before reading any; the commands to send again."""
        by_node: dict[tuple[str, int], list[_Command]] = {}
        for command in commands:
            assert command.node is not None
            by_node.setdefault(command.node, []).append(command)
        sent: list[tuple[redis.Redis, Any, list[_Command]]] = []
        failure: redis.RedisError | None = None
        for node, mine in by_node.items():
            client = self.client(node)
            wire = b"".join((ASKING if command.asking else b"") + resp(command.args) for command in mine)
            connection: Any = None
            try:
                connection = client.connection_pool.get_connection()
                connection.send_packed_command([wire])
            except redis.RedisError as exc:
                failure = failure or exc
                if connection is not None:
                    connection.disconnect()
                    client.connection_pool.release(connection)
                continue
            sent.append((client, connection, mine))
        again: list[_Command] = []
        moved = wait = False
        for client, connection, mine in sent:
            try:
                for command in mine:
                    if command.asking:
                        connection.read_response()
                        command.asking = False
                    try:
                        command.reply = connection.read_response(disable_decoding=True)
                    except MovedError as exc:  # before AskError: MovedError is one
                        moved = True
                        command.node = (exc.host, exc.port)
                        again.append(command)
                    except AskError as exc:
                        command.node, command.asking = (exc.host, exc.port), True
                        again.append(command)
                    except (TryAgainError, ClusterDownError):
                        wait = True
                        again.append(command)
                    except NoScriptError:
                        assert command.script is not None
                        client.script_load(command.script.script)
                        again.append(command)
            except redis.RedisError as exc:  # the node's connection: gone, or timed out
                connection.disconnect()
                failure = failure or exc
            finally:
                client.connection_pool.release(connection)
        if failure is not None:
            self._stale = True
            raise unavailable(failure) from failure
        if moved:
            self.refresh()
            for command in again:
                if not command.asking:
                    command.node = self._slots[command.slot]
        if wait:
            time.sleep(TRYAGAIN_SLEEP_S)
        return again
