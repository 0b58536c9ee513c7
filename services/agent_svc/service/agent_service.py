"""Agent business rules: ownership, validation, idempotent create, etags, masks, paging.

Scopes: reading needs `agents.read`, creating, changing and deleting `agents.write`; a
call without it is PERMISSION_DENIED (MISSING_SCOPE, metadata `scope`). The caller is the
token's subject: a user, a service account acting for itself, or the user a service acts
for with a delegated token; each version of an agent records who made it (`updated_by`)
and the service that acted for them (`updated_via`).

Visibility: a caller sees their own agents; `agents.admin` sees every agent. Someone else's
agent is NOT_FOUND, exactly like a missing one. Reads of one agent go through the cache,
which is keyed by id only, so the ownership check runs on whatever the cache returned.
Writes go to the database in one unit of work and invalidate the cache after commit.

Idempotent create (AIP-155): a create with a request_id records, in the same transaction
as the agent, a fingerprint of the request and the response (the agent as created). For
`request_id_ttl_seconds` a replay with the same fingerprint gets exactly that response,
even after the agent was updated or deleted, and creates nothing; the id with another
fingerprint is INVALID_ARGUMENT on `request_id` (REQUEST_ID_REUSED). An expired record is
replaced by the next create with its id. A replay is validated like any request.

Each owner may have at most `max_agents_per_owner` agents (0: no limit): one more create
is RESOURCE_EXHAUSTED (AGENT_QUOTA_EXCEEDED, with a QuotaFailure on `owners/<id>`) and
writes nothing. The repository counts agents per owner in the create's transaction, so
concurrent creates cannot pass the limit. A replay of a create is not a new agent: it is
answered before the quota is looked at.

Revisions and aliases (AIP-162): every change of configuration (the create, an update
that changes something, a rollback) records a revision in the same transaction, with who
made it; the revisions past the last `revisions_kept` that no alias names are removed in
that transaction too. `GetAgent` reads `id`, `id@<revision id>` (digits) or `id@<alias>`
(`[a-z][a-z0-9-]{0,62}`). Tags and untags lock the agent's row, so a revision being
pruned by a concurrent update is either tagged first (and kept) or gone (NOT_FOUND).

Soft delete (AIP-164): DeleteAgent marks the agent deleted (`delete_time`, and
`expire_time` `deleted_retention` later); it keeps its name (another agent of the owner
cannot take it until it expires: a write that finds the name held by an expired agent
the worker has not purged yet purges it in its own transaction) but not its place in the
quota (UndeleteAgent takes one again, RESOURCE_EXHAUSTED if there is none). Get and
BatchGet still return it (with its delete_time); List leaves it out unless
`show_deleted`; every change but Undelete and Purge is FAILED_PRECONDITION
(AGENT_DELETED); a second Delete is NOT_FOUND; Undelete of an agent that is not deleted
is ALREADY_EXISTS (AGENT_NOT_DELETED). Delete and Undelete change the etag, not the
configuration (no revision). PurgeAgent (`agents.admin`) removes an agent, deleted or
not, with its revisions and aliases at once.

A ListAgents page ends early, with a next_page_token, rather than carry more than
LIST_RESPONSE_BUDGET bytes of agents (but always at least one): with agents of up to 1 MiB
(validation.MAX_AGENT_BYTES) a client with gRPC's default 4 MiB receive limit can read
every page. Agents are sized by the `agent_size` function the composition root passes in
(the servicer's encoding; by default the same figure computed from the domain objects).
"""

from __future__ import annotations

import functools
import logging
import re
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import replace
from datetime import timedelta
from typing import Any, TypeVar

from services.agent_svc.domain import (
    Agent,
    AgentInput,
    AgentPage,
    AgentRevision,
    ChangeAuthor,
    RevisionPage,
)
from services.agent_svc.service.filtering import (
    AgentFilter,
    Ordering,
    SortField,
    parse_filter,
    parse_order_by,
)
from services.agent_svc.service.models import DEPRECATED, RETIRED, ModelCatalogue, ModelEntry
from services.agent_svc.service.paging import Cursor, PageTokens, page_size_of
from services.agent_svc.service.ports import (
    AgentAliases,
    AgentCache,
    AgentQuery,
    AgentUnitOfWork,
    AliasCache,
    ChangeKind,
    ChangeSignal,
    CreateRecord,
    NameTaken,
    QuotaExceeded,
    RequestReplayed,
    RevisionCache,
)
from services.agent_svc.service.replica import ReplicaReads
from services.agent_svc.service.sizing import agent_size, framed
from services.agent_svc.service.validation import check_agent, reported, shown
from services.agent_svc.service.watch import Watchers, WatchStream
from shared.config.clock import Clock
from shared.rpc.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    QuotaViolation,
    ResourceExhausted,
    Unimplemented,
)
from shared.security.scopes import AGENTS_ADMIN, AGENTS_READ, AGENTS_WRITE
from shared.security.tokens import Principal

__all__ = ["LIST_RESPONSE_BUDGET", "MUTABLE_FIELDS", "AgentService", "apply_update_mask"]

_log = logging.getLogger(__name__)

T = TypeVar("T")

MUTABLE_FIELDS = (
    "name",
    "description",
    "model",
    "instructions",
    "tools",
    "metadata",
    "temperature",
    "top_p",
)
IMMUTABLE_FIELDS = frozenset({"id", "owner_id"})
# The Agent fields agent.proto marks OUTPUT_ONLY (a unit test keeps the two equal), and
# the etag (sent for the compare, never set through the mask).
OUTPUT_ONLY_FIELDS = frozenset(
    {
        "create_time",
        "update_time",
        "etag",
        "updated_by",
        "updated_via",
        "revision_id",
        "revision_create_time",
        "delete_time",
        "expire_time",
    }
)
_METADATA_ENTRY = "metadata."
# Updates without an etag retry their compare-and-set this many times before ABORTED.
UPDATE_ATTEMPTS = 5
MAX_BATCH = 100  # BatchGetAgents (AIP-231)
# Aliases per agent: each keeps its revision past the retention, and ListAgentRevisions
# returns them all in every reply.
MAX_ALIASES = 100
# Bytes of serialized agents in one ListAgents response (a quarter of the default 4 MiB
# receive limit is left for the token and framing, and for safety).
LIST_RESPONSE_BUDGET = 3 * 1024 * 1024


# Parsed ids by their text: the same callers and agents come back on every read, and
# uuid.UUID() is pure Python (a fifth of a cache hit's own cost). Errors are not cached.
_uuid = functools.lru_cache(maxsize=16_384)(uuid.UUID)
# The longest spelling uuid.UUID() takes without padding ("urn:uuid:" + 36). It also drops
# every "-", so without this bound a megabyte of hyphens around 32 hex digits would parse,
# and stay in the cache above.
_MAX_UUID_TEXT = 45


def _parse_id(value: str, field: str) -> uuid.UUID:
    if not value:
        raise InvalidArgument.field(field, "required")
    if len(value) > _MAX_UUID_TEXT:
        raise InvalidArgument.field(field, "must be a UUID")
    try:
        return _uuid(value)
    except ValueError:
        raise InvalidArgument.field(field, "must be a UUID") from None


def _not_found(agent_id: uuid.UUID) -> NotFound:
    return NotFound(f"agent {agent_id} not found", reason="AGENT_NOT_FOUND")


def _etag_mismatch() -> Aborted:
    return Aborted(
        "the agent changed since the etag was read; read it again", reason="ETAG_MISMATCH"
    )


def _name_taken(name: str) -> AlreadyExists:
    return AlreadyExists(
        f"you already have an agent named {name!r} (a deleted agent keeps its name until "
        "it is purged)",
        reason="AGENT_NAME_TAKEN",
    )


def _agent_deleted(agent_id: uuid.UUID) -> FailedPrecondition:
    return FailedPrecondition(
        f"agent {agent_id} is deleted; undelete it first", reason="AGENT_DELETED"
    )


def _revision_not_found(agent_id: uuid.UUID, revision: str) -> NotFound:
    return NotFound(
        f"agent {agent_id} has no revision {revision} (never made, or pruned)",
        reason="REVISION_NOT_FOUND",
    )


def _alias_not_found(agent_id: uuid.UUID, alias: str) -> NotFound:
    return NotFound(f"agent {agent_id} has no alias {alias!r}", reason="ALIAS_NOT_FOUND")


# AIP-162 revision ids here are decimal (1, 2, …); aliases start with a letter, so the
# two never look alike after an "@".
_REVISION_ID = re.compile(r"[1-9][0-9]{0,17}")
_ALIAS = re.compile(r"[a-z][a-z0-9-]{0,62}")
_ALIAS_RULE = 'an alias is a lowercase letter, then up to 62 of "a-z", "0-9" and "-"'


def _revision_ref(text: str, field: str) -> int | str:
    """A revision id (int) or an alias (str), as written after `@` or in a request field."""
    if _REVISION_ID.fullmatch(text):
        return int(text)
    if _ALIAS.fullmatch(text):
        return text
    raise InvalidArgument.field(
        field, f"{shown(text)} is neither a revision id (1, 2, …) nor an alias ({_ALIAS_RULE})"
    )


def _alias_name(text: str, field: str) -> str:
    if not _ALIAS.fullmatch(text):
        raise InvalidArgument.field(field, f"{shown(text)} is not an alias: {_ALIAS_RULE}")
    return text


def _agent_ref(text: str, field: str) -> tuple[uuid.UUID, int | str | None]:
    """`id`, `id@revision` or `id@alias`: the id, and what follows the `@` (if any)."""
    agent_id, at, ref = text.partition("@")
    key = _parse_id(agent_id, field)
    if not at:
        return key, None
    if not ref:
        raise InvalidArgument.field(field, "nothing after @: name a revision id or an alias")
    return key, _revision_ref(ref, field)


class _ReadThrough:
    """The stand-in for an absent cache: every read loads."""

    def get(self, *args: Any) -> Any:
        return args[-1]()

    def invalidate(self, agent_id: uuid.UUID) -> None:
        """Nothing is kept."""

    def close(self) -> None:
        """Nothing to release."""


def _populated(patch: AgentInput) -> list[str]:
    """The fields a caller set (AIP-134 "empty mask"): non-default scalars, present
    optionals, non-empty lists and maps."""
    return [
        name
        for name, present in (
            ("name", patch.name != ""),
            ("description", patch.description != ""),
            ("model", patch.model != ""),
            ("instructions", patch.instructions != ""),
            ("tools", bool(patch.tools)),
            ("metadata", bool(patch.metadata)),
            ("temperature", patch.temperature is not None),
            ("top_p", patch.top_p is not None),
        )
        if present
    ]


def _mask_paths(update_mask: Sequence[str], patch: AgentInput) -> list[str]:
    """The mask resolved to mutable field paths (and `metadata.KEY` entries)."""
    paths = [p.strip() for p in update_mask]
    if not paths:
        return _populated(patch)
    if "*" in paths:
        if len(set(paths)) > 1:
            raise InvalidArgument.field("update_mask", '"*" must be the only path')
        return list(MUTABLE_FIELDS)
    resolved: list[str] = []
    problems: list[FieldViolation] = []
    for path in dict.fromkeys(paths):  # unique, in order
        if path in IMMUTABLE_FIELDS:
            problems.append(FieldViolation("update_mask", f"{path} cannot be changed"))
        elif path in OUTPUT_ONLY_FIELDS:
            continue  # output only: ignored (AIP-134)
        elif path in MUTABLE_FIELDS or (
            path.startswith(_METADATA_ENTRY) and len(path) > len(_METADATA_ENTRY)
        ):
            resolved.append(path)
        else:
            problems.append(FieldViolation("update_mask", f"unknown field path {shown(path)}"))
    if problems:
        raise InvalidArgument(reported(problems, "update_mask"))
    return resolved


def apply_update_mask(current: Agent, patch: AgentInput, paths: Sequence[str]) -> AgentInput:
    """The caller-settable fields after the update: the named paths from the patch, the
    rest from the current agent."""
    fields = current.settable
    metadata = dict(fields.metadata)
    for path in paths:
        if path.startswith(_METADATA_ENTRY):
            key = path[len(_METADATA_ENTRY) :]
            if key in patch.metadata:
                metadata[key] = patch.metadata[key]
            else:  # a named entry absent from the patch is removed
                metadata.pop(key, None)
        elif path == "metadata":
            metadata = dict(patch.metadata)
        else:
            fields = replace(fields, **{path: getattr(patch, path)})
    return replace(fields, metadata=metadata)


class _Caller:
    """Who calls, as the rules need it (built on every call: a plain class is cheapest)."""

    __slots__ = ("author", "id", "is_admin")

    def __init__(self, caller_id: uuid.UUID, is_admin: bool, author: ChangeAuthor) -> None:
        self.id = caller_id
        self.is_admin = is_admin
        self.author = author

    def sees(self, agent: Agent) -> bool:
        return self.is_admin or agent.owner_id == self.id


def _caller(principal: Principal, scope: str) -> _Caller:
    """The caller, if their token grants `scope` (else PERMISSION_DENIED naming it).

    The caller is the token's subject: a user, a service account acting for itself, or
    the user a service acts for (a delegated token), with the service as `via`."""
    granted = principal.granted
    if scope not in granted:
        raise PermissionDenied(
            f"the access token does not grant the {scope} scope",
            reason="MISSING_SCOPE",
            metadata={"scope": scope},
        )
    caller_id = principal.subject
    if caller_id is None:
        try:
            caller_id = _uuid(principal.user_id)
        except ValueError:
            raise PermissionDenied(
                "the caller is not a user account", reason="CALLER_NOT_A_USER"
            ) from None
    kind = "serviceAccounts" if principal.is_service_account else "users"
    author = ChangeAuthor(
        f"{kind}/{caller_id}", f"serviceAccounts/{principal.actor}" if principal.actor else ""
    )
    return _Caller(caller_id, AGENTS_ADMIN in granted, author)


class AgentService:
    """The agent use cases; every dependency arrives through the constructor."""

    def __init__(
        self,
        *,
        uow: Callable[[], AgentUnitOfWork],
        cache: AgentCache,
        clock: Clock,
        allowed_models: Collection[str],
        page_tokens: PageTokens,
        agent_size: Callable[[Agent], int] = agent_size,
        request_id_ttl_seconds: float = 86_400.0,
        max_agents_per_owner: int = 0,
        read_uow: Callable[[], AgentUnitOfWork] | None = None,
        replica: ReplicaReads | None = None,
        catalogue: ModelCatalogue | None = None,
        revisions_kept: int = 100,
        deleted_retention_seconds: float = 30 * 86_400.0,
        alias_cache: AliasCache | None = None,
        revision_cache: RevisionCache | None = None,
        changes: ChangeSignal | None = None,
        watchers: Watchers | None = None,
    ) -> None:
        if revisions_kept < 1:
            raise ValueError("revisions_kept must be at least 1 (the current revision)")
        self._uow = uow
        # Reads of one statement (a cache miss, a page) need no transaction of their own:
        # the composition root may hand a unit of work that skips BEGIN and ROLLBACK.
        self._read_uow = read_uow or uow
        # Reads that tolerate a replica's lag (ListAgents, cache misses the cache deems
        # safe); None: everything reads the primary.
        self._replica = replica
        self._cache = cache
        self._clock = clock
        self._catalogue = catalogue or ModelCatalogue.of_active(allowed_models)
        self._page_tokens = page_tokens
        self._agent_size = agent_size
        self._request_id_ttl = timedelta(seconds=request_id_ttl_seconds)
        self._max_agents_per_owner = max_agents_per_owner
        self._revisions_kept = revisions_kept
        self._deleted_retention = timedelta(seconds=deleted_retention_seconds)
        # `is None`, not `or`: an empty cache has a length of 0.
        self._alias_cache: AliasCache = _ReadThrough() if alias_cache is None else alias_cache
        self._revision_cache: RevisionCache = (
            _ReadThrough() if revision_cache is None else revision_cache
        )
        # Told after every commit that logged a change (the watch hubs read the log then).
        self._changes = changes
        self._watchers = watchers

    def _changed(self) -> None:
        if self._changes is not None:
            try:
                self._changes.changed()
            except Exception:  # the hubs poll the log anyway: a lost signal only delays
                _log.warning("could not signal a change to the watch hubs", exc_info=True)

    # -- create and read ----------------------------------------------------------------

    def create(
        self,
        *,
        principal: Principal,
        agent: AgentInput,
        request_id: str = "",
        validate_only: bool = False,
    ) -> Agent:
        """Creates an agent owned by the caller. With a request_id (AIP-155), a replay of
        the same request returns the first response, as it was then; the id used for a
        different request is INVALID_ARGUMENT (REQUEST_ID_REUSED). `validate_only`
        (AIP-163): the agent that would be created, after every check the real create
        makes (a taken name, the quota, a reused request id: the writes are made and
        rolled back); nothing is stored and no change is announced."""
        caller = _caller(principal, AGENTS_WRITE)
        request = _parse_id(request_id, "request_id") if request_id else None
        self._check(agent)
        new = Agent.new(agent, owner_id=caller.id, now=self._clock.now(), author=caller.author)
        with self._uow() as uow:
            if request is not None:
                first = self._record_create(uow, caller.id, request, agent.fingerprint, new)
                if first is not None:
                    return first
            try:
                _, freed = self._freeing_expired_name(
                    uow,
                    caller.id,
                    new.name,
                    lambda: uow.agents.add(new, max_per_owner=self._max_agents_per_owner),
                )
            except NameTaken:
                raise _name_taken(new.name) from None
            except QuotaExceeded:
                raise self._quota_exceeded(caller.id) from None
            uow.revisions.add(new.current_revision, keep=self._revisions_kept)
            if validate_only:
                return new  # not committed: the unit of work rolls back
            uow.changes.append(ChangeKind.CREATED, new)
            uow.commit()
        self._forget(freed)
        self._changed()
        return new

    def _freeing_expired_name(
        self, uow: AgentUnitOfWork, owner_id: uuid.UUID, name: str, write: Callable[[], T]
    ) -> tuple[T, Agent | None]:
        """`write()` (an add or an update that takes `name`), run once more after freeing
        the name when an expired agent held it; its result and the agent purged for it.
        NameTaken when the name stays taken."""
        try:
            return write(), None
        except NameTaken:
            free, freed = self._free_expired_name(uow, owner_id, name)
            if not free:
                raise
        return write(), freed

    def _free_expired_name(
        self, uow: AgentUnitOfWork, owner_id: uuid.UUID, name: str
    ) -> tuple[bool, Agent | None]:
        """Whether `name`, found taken, is free now, and the agent purged to free it. An
        agent holding it past its expire_time (gone for every call, AIP-164, but not yet
        purged by the worker) is purged in the caller's transaction, as the worker would
        (its PURGED change logged). One the worker purged meanwhile (our purge removed
        nothing) leaves the name free too. Held by an agent that exists, or can still be
        undeleted: not free."""
        now = self._clock.now()
        holder = uow.agents.named(owner_id, name)
        if holder is not None and holder.expired(now):
            purged = uow.agents.purge(holder.id, expected_revision=holder.revision)
            if purged is not None:
                uow.changes.append(ChangeKind.PURGED, purged)
                return True, purged
            holder = uow.agents.named(owner_id, name)  # purged by the worker meanwhile?
        return holder is None, None

    def _forget(self, purged: Agent | None) -> None:
        """Drops a purged agent from the caches (after the commit that purged it)."""
        if purged is not None:
            self._cache.invalidate(purged.id)
            self._alias_cache.invalidate(purged.id)

    def _check(self, agent: AgentInput) -> None:
        """The agent's rules; a retired model (or a deprecated one from its sunset date
        on) is refused naming its replacement, with the agent's other problems."""
        today = self._clock.now().date()
        allowed = self._catalogue.usable_on(today)
        refused = self._catalogue.retired(agent.model, today)
        if refused is None:
            check_agent(agent, allowed)
            return
        replacement = self._catalogue.replacement_on(refused, today)
        instead = f"; use {replacement}" if replacement else ""
        why = (
            f"reached its sunset date {refused.sunset.isoformat()}"
            if refused.state == DEPRECATED and refused.sunset is not None
            else "is retired"
        )
        violation = FieldViolation("agent.model", f"{agent.model} {why}{instead}")
        try:
            check_agent(agent, allowed)
        except InvalidArgument as exc:
            others = [v for v in exc.violations if v.field != "agent.model"]
            raise InvalidArgument([violation, *others]) from None
        raise InvalidArgument([violation])

    def model_notice(self, model: str) -> ModelEntry | None:
        """What a reply says about the agent's model: its entry when it is deprecated (with
        the replacement to use today)."""
        entry = self._catalogue.notice(model)
        if entry is None:
            return None
        today = self._clock.now().date()
        # As ListModels shows it today: past its sunset it is retired.
        (as_today,) = [e for e in self._catalogue.entries_on(today) if e.name == entry.name]
        return as_today

    def models(self, *, principal: Principal) -> list[tuple[ModelEntry, int]]:
        """The catalogue, each model with the agents using it: the caller's (an admin: all)."""
        caller = _caller(principal, AGENTS_READ)
        with self._read_uow() as uow:
            counts = uow.agents.count_by_model(None if caller.is_admin else caller.id)
        entries = list(self._catalogue.entries_on(self._clock.now().date()))
        known = {entry.name for entry in entries}
        # Agents naming a model no longer in the catalogue show too (a retired one dropped).
        entries += [ModelEntry(name, RETIRED) for name in sorted(set(counts) - known)]
        return [(entry, counts.get(entry.name, 0)) for entry in entries]

    def _quota_exceeded(self, owner_id: uuid.UUID) -> ResourceExhausted:
        limit = self._max_agents_per_owner
        agents = f"{limit:,} agent{'' if limit == 1 else 's'}"
        return ResourceExhausted(
            f"you have {agents}, the most an owner may have; delete one to create another",
            reason="AGENT_QUOTA_EXCEEDED",
            quota_violations=(QuotaViolation(f"owners/{owner_id}", f"at most {agents} per owner"),),
        )

    def _record_create(
        self,
        uow: AgentUnitOfWork,
        owner_id: uuid.UUID,
        request: uuid.UUID,
        fingerprint: str,
        new: Agent,
    ) -> Agent | None:
        """Records `new` as the response to this request id, or returns the response of
        the create that used the id first. The record goes in before the agent, so a
        concurrent create with the same id waits on its key and then replays."""
        live_after = new.create_time - self._request_id_ttl
        record = uow.create_requests.get(owner_id, request, created_after=live_after)
        if record is None:
            try:
                uow.create_requests.add(
                    owner_id, request, CreateRecord(fingerprint, new), created_after=live_after
                )
                return None
            except RequestReplayed:  # a concurrent create with this id committed first
                record = uow.create_requests.get(owner_id, request, created_after=live_after)
            if record is None:
                raise Aborted(
                    "a concurrent request with this request_id is in progress",
                    reason="REQUEST_IN_PROGRESS",
                )
        if record.fingerprint not in (None, fingerprint):
            raise InvalidArgument(
                FieldViolation("request_id", "already used for a different request"),
                reason="REQUEST_ID_REUSED",
            )
        return record.agent

    def get(self, *, principal: Principal, agent_id: str) -> Agent:
        """One agent, if the caller may see it (deleted ones too, AIP-164): `id`, or the
        agent as it was at a revision, `id@<revision id>` or `id@<alias>`."""
        caller = _caller(principal, AGENTS_READ)
        key, ref = _agent_ref(agent_id, "id")
        agent = self._visible(caller, key)
        if ref is None:
            return agent
        return agent.at(self._revision(agent, ref))

    def _visible(self, caller: _Caller, key: uuid.UUID) -> Agent:
        agent = self._cache_get(key)
        if agent is None or not caller.sees(agent) or agent.expired(self._clock.now()):
            raise _not_found(key)
        return agent

    def _aliases(self, key: uuid.UUID) -> dict[str, int]:
        def load() -> AgentAliases:
            with self._read_uow() as uow:
                return AgentAliases(key, uow.revisions.aliases(key))

        found = self._alias_cache.get(key, load)
        return dict(found.aliases) if found is not None else {}

    def _revision(self, agent: Agent, ref: int | str) -> AgentRevision:
        """The revision `ref` (an id or an alias) of an agent the caller may see."""
        key = agent.id
        aliases: dict[str, int] | None = None
        if isinstance(ref, str):
            aliases = self._aliases(key)
            if ref not in aliases:
                raise _alias_not_found(key, ref)
            revision_id = aliases[ref]
        else:
            revision_id = ref
        if revision_id == agent.revision_id:
            return agent.current_revision
        if revision_id > agent.revision_id:
            raise _revision_not_found(key, str(ref))
        if self._past_retention(agent, revision_id):
            # Kept only while an alias names it (a copy in memory of a pruned one must
            # not answer).
            aliases = aliases if aliases is not None else self._aliases(key)
            if revision_id not in aliases.values():
                raise _revision_not_found(key, str(ref))

        def load() -> AgentRevision | None:
            with self._read_uow() as uow:
                return uow.revisions.get(key, revision_id)

        revision = self._revision_cache.get(key, revision_id, load)
        if revision is None:
            raise _revision_not_found(key, str(ref))
        return revision

    def _past_retention(self, agent: Agent, revision_id: int) -> bool:
        """Older than the agent's last AGENT_REVISIONS_KEPT revisions: such a revision is
        kept (and shown, tagged, rolled back to) only while an alias names it. The rule
        every read and write applies, so they agree even before a prune has removed it
        (after an untag made in an older release, or a lowered setting)."""
        return revision_id <= agent.revision_id - self._revisions_kept

    def _revision_in(
        self, uow: AgentUnitOfWork, agent: Agent, ref: int | str, text: str
    ) -> AgentRevision:
        """The revision `ref` (an id or an alias) as the write's own transaction sees it
        (no cache: a write decides on what it has locked or will compare-and-set)."""
        aliases = uow.revisions.aliases(agent.id)
        if isinstance(ref, str):
            if ref not in aliases:
                raise _alias_not_found(agent.id, ref)
            revision_id = aliases[ref]
        else:
            revision_id = ref
        if revision_id == agent.revision_id:
            return agent.current_revision
        if revision_id > agent.revision_id:  # never made (nor storable beyond 32 bits)
            raise _revision_not_found(agent.id, text)
        if self._past_retention(agent, revision_id) and revision_id not in aliases.values():
            raise _revision_not_found(agent.id, text)
        revision = uow.revisions.get(agent.id, revision_id)
        if revision is None:
            raise _revision_not_found(agent.id, text)
        return revision

    def list_revisions(
        self, *, principal: Principal, agent_id: str, page_size: int = 0, page_token: str = ""
    ) -> RevisionPage:
        """The agent's kept revisions, newest first (AIP-162), each as the agent was then,
        and its aliases."""
        caller = _caller(principal, AGENTS_READ)
        key = _parse_id(agent_id, "id")
        limit = page_size_of(page_size)
        agent = self._visible(caller, key)
        # The token's cursor is the last revision id shown, as text (the page-token codec's
        # text key), bound to the caller and the agent.
        binding = f"revisions\n{caller.id}\n{key}"
        before: int | None = None
        if page_token:
            cursor = self._page_tokens.read(page_token, binding=binding, field=SortField.NAME)
            if not isinstance(cursor.value, str) or not _REVISION_ID.fullmatch(cursor.value):
                raise InvalidArgument.field("page_token", "invalid")
            before = int(cursor.value)
        with self._read_uow() as uow:
            rows = uow.revisions.list_page(key, before=before, limit=limit + 1)
            aliases = uow.revisions.aliases(key)
        examined, fetched_more = rows[:limit], len(rows) > limit
        tagged = set(aliases.values())
        shown = [
            revision
            for revision in examined
            if not self._past_retention(agent, revision.revision_id)
            or revision.revision_id in tagged
        ]
        page = self._within_budget([agent.at(revision) for revision in shown])
        # A page may be short (past-retention revisions not shown, or the size budget);
        # the cursor is the last revision shown, or, when all were, the last examined.
        if len(page) < len(shown):
            last: int | None = page[-1].revision_id
        elif fetched_more and examined:
            last = examined[-1].revision_id
        else:
            last = None
        next_token = (
            self._page_tokens.issue(Cursor(str(last), key), binding=binding)
            if last is not None
            else ""
        )
        return RevisionPage(page, next_token, aliases)

    def batch_get(self, *, principal: Principal, agent_ids: Sequence[str]) -> list[Agent]:
        """Up to MAX_BATCH agents in the order asked (AIP-231): all, or NOT_FOUND naming
        the first one the caller may not see."""
        caller = _caller(principal, AGENTS_READ)
        if not agent_ids:
            raise InvalidArgument.field("ids", "name at least one agent")
        if len(agent_ids) > MAX_BATCH:
            raise InvalidArgument.field("ids", f"at most {MAX_BATCH} agents at once")
        problems: list[FieldViolation] = []
        keys: list[uuid.UUID] = []
        for index, text in enumerate(agent_ids):
            try:
                keys.append(_parse_id(text, f"ids[{index}]"))
            except InvalidArgument as exc:
                problems += exc.violations
        if problems:
            raise InvalidArgument(problems)
        found: dict[uuid.UUID, Agent] = {}
        for key in dict.fromkeys(keys):  # each once, through the cache like GetAgent
            agent = self._cache_get(key)
            if agent is None or not caller.sees(agent) or agent.expired(self._clock.now()):
                raise _not_found(key)
            found[key] = agent
        agents = [found[key] for key in keys]
        size = sum(framed(self._agent_size(agent)) for agent in agents)
        if size > LIST_RESPONSE_BUDGET:  # a default client could not receive the reply
            raise InvalidArgument.field(
                "ids",
                f"these agents add up to {size:,} bytes, over the "
                f"{LIST_RESPONSE_BUDGET:,} a response may carry: ask for fewer at once",
            )
        return agents

    def _cache_get(self, key: uuid.UUID) -> Agent | None:
        """The agent through the cache: a miss reads the primary, or the replica when the
        cache knows it cannot lack a write of this agent."""
        replica = self._replica

        def load(uow: AgentUnitOfWork) -> Agent | None:
            return uow.agents.get(key)

        def from_primary() -> Agent | None:
            with self._read_uow() as uow:
                return load(uow)

        return self._cache.get(
            key,
            from_primary,
            load_lagging=None if replica is None else lambda: replica.read(load, self._read_uow),
        )

    def _on_replica(self, work: Callable[[AgentUnitOfWork], T]) -> T:
        """A read that tolerates a replica's lag: on the replica if there is one."""
        if self._replica is None:
            with self._read_uow() as uow:
                return work(uow)
        return self._replica.read(work, self._read_uow)

    def list(
        self,
        *,
        principal: Principal,
        page_size: int = 0,
        page_token: str = "",
        filter: str = "",  # the AIP-160 request field's name
        order_by: str = "",
        show_deleted: bool = False,
    ) -> AgentPage:
        """The caller's agents (an admin: everyone's), filtered, ordered, one page;
        soft-deleted ones only with `show_deleted`."""
        caller = _caller(principal, AGENTS_READ)
        limit = page_size_of(page_size)
        conditions = parse_filter(filter, allow_owner=caller.is_admin)
        ordering = parse_order_by(order_by)
        owner = None if caller.is_admin else caller.id
        binding = _binding(caller, owner, conditions, ordering)
        if show_deleted:
            binding += "\nshow_deleted"
        after = (
            self._page_tokens.read(page_token, binding=binding, field=ordering.field)
            if page_token
            else None
        )
        query = AgentQuery(
            owner, conditions, ordering, after, limit + 1, show_deleted, self._clock.now()
        )
        rows = self._on_replica(lambda uow: uow.agents.list_page(query))  # may lag a little
        page = self._within_budget(rows[:limit])
        more = len(rows) > len(page)
        next_token = (
            self._page_tokens.issue(_cursor(page[-1], ordering.field), binding=binding)
            if more
            else ""
        )
        return AgentPage(page, next_token)

    def _within_budget(self, rows: Sequence[Agent]) -> tuple[Agent, ...]:
        """The leading rows whose encoding fits LIST_RESPONSE_BUDGET (at least one)."""
        used = 0
        for count, agent in enumerate(rows):
            used += framed(self._agent_size(agent))
            if count and used > LIST_RESPONSE_BUDGET:
                return tuple(rows[:count])
        return tuple(rows)

    # -- change -------------------------------------------------------------------------

    def update(
        self,
        *,
        principal: Principal,
        agent_id: str,
        patch: AgentInput,
        update_mask: Sequence[str] = (),
        etag: str = "",
        validate_only: bool = False,
    ) -> Agent:
        """Applies the masked fields (AIP-134); a set etag must match (else ABORTED).
        `validate_only` (AIP-163): the agent that would result, after every check the
        real update makes (the write is made and rolled back); nothing is stored."""
        caller = _caller(principal, AGENTS_WRITE)
        key = _parse_id(agent_id, "agent.id")
        paths = _mask_paths(update_mask, patch)
        for _attempt in range(UPDATE_ATTEMPTS):
            updated = self._try_update(caller, key, patch, paths, etag, dry_run=validate_only)
            if updated is not None:
                if not validate_only:
                    self._cache.invalidate(key)
                return updated
            if etag:  # the etag the caller sent is stale now: someone else won
                raise _etag_mismatch()
            _log.info("concurrent update of agent %s; retrying", key)
        raise Aborted("too many concurrent updates; try again", reason="CONCURRENT_UPDATE")

    @staticmethod
    def _changeable(caller: _Caller, key: uuid.UUID, current: Agent | None, etag: str) -> Agent:
        """The agent, if the caller may change it: NOT_FOUND, FAILED_PRECONDITION
        (deleted) or ABORTED (etag) otherwise."""
        if current is None or not caller.sees(current):
            raise _not_found(key)
        if current.deleted:
            raise _agent_deleted(key)
        if etag and etag != current.etag:
            raise _etag_mismatch()
        return current

    def _try_update(
        self,
        caller: _Caller,
        key: uuid.UUID,
        patch: AgentInput,
        paths: Sequence[str],
        etag: str,
        *,
        dry_run: bool = False,
    ) -> Agent | None:
        """The updated agent, or None if a concurrent update won the compare-and-set."""
        with self._uow() as uow:
            current = self._changeable(caller, key, uow.agents.get(key), etag)
            fields = apply_update_mask(current, patch, paths)
            return self._revise(uow, caller, current, fields, dry_run=dry_run)

    def _revise(
        self,
        uow: AgentUnitOfWork,
        caller: _Caller,
        current: Agent,
        fields: AgentInput,
        *,
        dry_run: bool = False,
    ) -> Agent | None:
        """Stores `fields` as the agent's next revision and commits (`dry_run`: makes the
        writes, then leaves them to the unit of work's rollback); the agent as it was
        when nothing changes (no write, no revision); None if a concurrent write won."""
        if fields == current.settable:
            return current  # nothing changes (e.g. only output-only paths): no write
        self._check(fields)
        updated = current.revised(fields, now=self._clock.now(), author=caller.author)
        try:
            stored, freed = self._freeing_expired_name(
                uow,
                current.owner_id,
                updated.name,
                lambda: uow.agents.update(updated, expected_revision=current.revision),
            )
        except NameTaken:
            raise _name_taken(updated.name) from None
        if not stored:
            return None
        uow.revisions.add(updated.current_revision, keep=self._revisions_kept)
        if dry_run:
            return updated
        uow.changes.append(ChangeKind.UPDATED, updated, previous=current)
        uow.commit()
        self._forget(freed)
        self._changed()
        return updated

    def rollback(
        self, *, principal: Principal, agent_id: str, revision_id: str, etag: str = ""
    ) -> Agent:
        """Makes the configuration of an earlier revision (an id or an alias) the agent's
        next revision (AIP-162); a set etag must match. Rolling back to the configuration
        the agent has already changes nothing."""
        caller = _caller(principal, AGENTS_WRITE)
        key = _parse_id(agent_id, "id")
        if not revision_id:
            raise InvalidArgument.field("revision_id", "required")
        ref = _revision_ref(revision_id, "revision_id")
        for _attempt in range(UPDATE_ATTEMPTS):
            with self._uow() as uow:
                current = self._changeable(caller, key, uow.agents.get(key), etag)
                target = self._revision_in(uow, current, ref, revision_id)
                updated = self._revise(uow, caller, current, target.fields)
            if updated is not None:
                self._cache.invalidate(key)
                return updated
            if etag:
                raise _etag_mismatch()
        raise Aborted("too many concurrent updates; try again", reason="CONCURRENT_UPDATE")

    def tag(self, *, principal: Principal, agent_id: str, revision_id: str, alias: str) -> Agent:
        """Points `alias` at a revision (an id, or what another alias names), creating or
        moving it; the agent as it is at that revision."""
        caller = _caller(principal, AGENTS_WRITE)
        key = _parse_id(agent_id, "id")
        name = _alias_name(alias, "alias")
        if not revision_id:
            raise InvalidArgument.field("revision_id", "required")
        ref = _revision_ref(revision_id, "revision_id")
        with self._uow() as uow:
            # The row lock: a concurrent update cannot prune the revision between the
            # check and the tag (it waits, then keeps the tagged revision).
            current = self._changeable(caller, key, uow.agents.get(key, for_update=True), "")
            target = self._revision_in(uow, current, ref, revision_id)
            aliases = uow.revisions.aliases(key)
            if name not in aliases and len(aliases) >= MAX_ALIASES:
                raise ResourceExhausted(
                    f"agent {key} has {MAX_ALIASES} aliases, the most an agent may have; "
                    "untag one to add another",
                    reason="ALIAS_LIMIT_REACHED",
                    quota_violations=(
                        QuotaViolation(f"agents/{key}", f"at most {MAX_ALIASES} aliases"),
                    ),
                )
            moved = aliases.get(name) != target.revision_id
            uow.revisions.set_alias(
                key, name, target.revision_id, now=self._clock.now(), by=caller.author.by
            )
            if moved:  # tagging the revision it names already is no change
                uow.changes.append(
                    ChangeKind.TAGGED, current, alias=name, alias_revision=target.revision_id
                )
            uow.commit()
        self._alias_cache.invalidate(key)
        if moved:
            self._changed()
        return current.at(target)

    def untag(self, *, principal: Principal, agent_id: str, alias: str) -> None:
        """Removes an alias (the revision it named may then be pruned)."""
        caller = _caller(principal, AGENTS_WRITE)
        key = _parse_id(agent_id, "id")
        name = _alias_name(alias, "alias")
        with self._uow() as uow:
            current = self._changeable(caller, key, uow.agents.get(key, for_update=True), "")
            if not uow.revisions.remove_alias(key, name):
                raise _alias_not_found(key, name)
            # The revision it named may now be past the retention: pruned at once, so the
            # list, reads and tags agree.
            uow.revisions.prune(key, newest=current.revision_id, keep=self._revisions_kept)
            uow.changes.append(ChangeKind.UNTAGGED, current, alias=name)
            uow.commit()
        self._alias_cache.invalidate(key)
        self._changed()

    def delete(self, *, principal: Principal, agent_id: str, etag: str = "") -> Agent:
        """Soft-deletes an agent the caller may change (AIP-164); a non-empty etag must
        match; an agent already deleted is NOT_FOUND. The agent as deleted."""
        caller = _caller(principal, AGENTS_WRITE)
        key = _parse_id(agent_id, "id")

        def attempt() -> Agent | None:
            with self._uow() as uow:
                current = uow.agents.get(key)
                if current is None or not caller.sees(current) or current.deleted:
                    raise _not_found(key)
                if etag and etag != current.etag:
                    raise _etag_mismatch()
                now = self._clock.now()
                deleted = current.soft_deleted(now=now, expire_time=now + self._deleted_retention)
                if not uow.agents.soft_delete(deleted, expected_revision=current.revision):
                    return None
                uow.changes.append(ChangeKind.DELETED, deleted)
                uow.commit()
            return deleted

        deleted = self._until_stored(attempt, etag)
        self._cache.invalidate(key)
        self._changed()
        return deleted

    def undelete(self, *, principal: Principal, agent_id: str, etag: str = "") -> Agent:
        """Restores a soft-deleted agent (AIP-164): ALREADY_EXISTS if it is not deleted;
        it takes a place in the owner's quota again."""
        caller = _caller(principal, AGENTS_WRITE)
        key = _parse_id(agent_id, "id")

        def attempt() -> Agent | None:
            with self._uow() as uow:
                current = uow.agents.get(key)
                if current is None or not caller.sees(current):
                    raise _not_found(key)
                if current.expired(self._clock.now()):  # awaiting the worker's purge
                    raise _not_found(key)
                if not current.deleted:
                    raise AlreadyExists(f"agent {key} is not deleted", reason="AGENT_NOT_DELETED")
                if etag and etag != current.etag:
                    raise _etag_mismatch()
                restored = current.undeleted()
                try:
                    stored = uow.agents.undelete(
                        restored,
                        expected_revision=current.revision,
                        max_per_owner=self._max_agents_per_owner,
                    )
                except QuotaExceeded:
                    raise self._quota_exceeded(current.owner_id) from None
                if not stored:
                    return None
                uow.changes.append(ChangeKind.UNDELETED, restored)
                uow.commit()
            return restored

        restored = self._until_stored(attempt, etag)
        self._cache.invalidate(key)
        self._changed()
        return restored

    @staticmethod
    def _until_stored(attempt: Callable[[], Agent | None], etag: str) -> Agent:
        """Runs a compare-and-set write until it wins: with an etag, once (a lost race
        is ETAG_MISMATCH); without, up to UPDATE_ATTEMPTS times."""
        for _attempt in range(1 if etag else UPDATE_ATTEMPTS):
            stored = attempt()
            if stored is not None:
                return stored
        if etag:
            raise _etag_mismatch()
        raise Aborted("too many concurrent updates; try again", reason="CONCURRENT_UPDATE")

    def purge(self, *, principal: Principal, agent_id: str, etag: str = "") -> Agent:
        """Removes an agent (deleted or not) with its revisions and aliases at once
        (`agents.admin` only); a non-empty etag must match. The agent as it was."""
        _caller(principal, AGENTS_ADMIN)
        key = _parse_id(agent_id, "id")

        def attempt() -> Agent | None:
            with self._uow() as uow:
                current = uow.agents.get(key)
                if current is None:
                    raise _not_found(key)
                if etag and etag != current.etag:
                    raise _etag_mismatch()
                purged = uow.agents.purge(key, expected_revision=current.revision)
                if purged is None:
                    return None
                uow.changes.append(ChangeKind.PURGED, purged)
                uow.commit()
            return purged

        purged = self._until_stored(attempt, etag)
        self._cache.invalidate(key)
        self._alias_cache.invalidate(key)
        self._changed()
        return purged

    # -- watch --------------------------------------------------------------------------

    def watch(
        self, *, principal: Principal, filter: str = "", resume_token: str = ""
    ) -> WatchStream:
        """A stream of the committed changes the caller may see, filtered like a list
        (see services.agent_svc.service.watch)."""
        caller = _caller(principal, AGENTS_READ)
        if self._watchers is None:
            raise Unimplemented("WatchAgents is not served by this server")
        return self._watchers.open(
            viewer=caller.id,
            is_admin=caller.is_admin,
            filter=filter,
            resume_token=resume_token,
            principal=principal,
        )


def _binding(
    caller: _Caller, owner: uuid.UUID | None, conditions: AgentFilter, ordering: Ordering
) -> str:
    """What a page token is bound to: who asks, which rows they see, filter and order."""
    scope = str(owner) if owner is not None else "*"
    return "\n".join((str(caller.id), scope, conditions.canonical(), ordering.canonical()))


def _cursor(agent: Agent, field: SortField) -> Cursor:
    if field is SortField.NAME:
        return Cursor(agent.name, agent.id)
    if field is SortField.UPDATE_TIME:
        return Cursor(agent.update_time, agent.id)
    return Cursor(agent.create_time, agent.id)
