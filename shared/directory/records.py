"""What the directory stores: records whose fields are declared once, by the management API's
models, and their rows in Table Storage.

`@record(Model)` makes a class a dataclass of the model's fields (besides any of its own), with
the model's defaults. A record is built without validation: the model checked a body before it
became a record, and what was checked when written is trusted when read. `to_entity` and
`from_entity` turn a record into a table row and back, each field by its type (tables hold no
lists or date-times: a list is its items joined by commas, a date-time its ISO 8601 text, and
a list that may be null, where null and empty mean different things, is JSON text); a
field a row lacks, or holds empty, takes its default, so rows written before a field existed
still load. `Rows` keeps the records of one kind in one partition of a table.
"""

from __future__ import annotations

import inspect
import json
import secrets
import types
from collections.abc import Callable, Collection, Mapping
from dataclasses import MISSING, dataclass, field, fields
from datetime import datetime
from functools import cache
from typing import Any, Union, get_args, get_origin, get_type_hints

from pydantic import BaseModel

from shared.platform.tables import Conflict, Tables


def record[T](
    *models: type[BaseModel],
    leave_out: Collection[str] = (),
    defaults: Mapping[str, Any] | None = None,
    partition_key: str = "",
) -> Callable[[type[T]], type[T]]:
    """A class as a dataclass holding every field of `models` (but `leave_out`), then its own;
    keyword arguments only. A field takes its model's default, or its default in `defaults`:
    for fields an answer always carries (so its model requires them) that a record made in
    code, or stored before the field existed, may lack. Its `id` is its row key;
    `partition_key` names the field that is its partition key (none: the table's, see `Rows`)."""

    def build(cls: type[T]) -> type[T]:
        own = inspect.get_annotations(cls)
        taken: dict[str, Any] = {}
        more = dict(defaults or {})
        for model in models:
            for name, info in model.model_fields.items():
                if name in leave_out or name in own or name in taken:
                    continue
                taken[name] = info.annotation
                if info.default_factory is not None:
                    setattr(cls, name, field(default_factory=info.default_factory))
                elif not info.is_required():
                    setattr(cls, name, info.default)
                elif name in more:
                    setattr(cls, name, more.pop(name))
        if more:
            raise TypeError(f"{cls.__name__}: defaults for no required field: {sorted(more)}")
        cls.__annotations__ = {**taken, **own}
        cls._keys = frozenset({"id", partition_key} - {""})
        cls._partition_key = partition_key
        return dataclass(kw_only=True)(cls)

    return build


def new_id() -> str:
    """A record's random id: 16 hexadecimal digits."""
    return secrets.token_hex(8)


def _encode(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, list):
        return ",".join(value)
    return value


def _nullable_list(kind: Any) -> bool:
    """`list[...] | None`: null (say, "all of them") is not the empty list."""
    if get_origin(kind) not in (Union, types.UnionType):
        return False
    args = get_args(kind)
    return type(None) in args and any(get_origin(arg) is list for arg in args)


def _codec(kind: Any) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """(encoder, decoder) of a field's stored value, by its type."""
    if _nullable_list(kind):
        return json.dumps, lambda value: json.loads(str(value))
    if kind is datetime:
        return _encode, lambda value: datetime.fromisoformat(str(value))
    if get_origin(kind) is list:
        return _encode, lambda value: [part for part in str(value).split(",") if part]
    if kind in (int, bool):
        return _encode, kind
    return _encode, lambda value: value


_Layout = tuple[
    tuple[str, Callable[[Any], Any], Callable[[Any], Any], Callable[[], Any] | None], ...
]


@cache
def _layout(cls: type) -> _Layout:
    """(name, encoder, decoder, what makes its default) of each field a row holds; None:
    required."""
    hints = get_type_hints(cls)
    found = []
    for spec in fields(cls):
        if spec.name in cls._keys or not spec.init:  # keys, or worked out from the others
            continue
        if spec.default_factory is not MISSING:
            default = spec.default_factory
        else:
            default = None if spec.default is MISSING else (lambda value=spec.default: value)
        found.append((spec.name, *_codec(hints[spec.name]), default))
    return tuple(found)


def to_entity(item: Any, partition: str = "") -> dict[str, Any]:
    """A record as a table row: its id the row key, its partition key field (or `partition`)
    the partition key, its other fields the properties."""
    key = type(item)._partition_key
    data = {name: encode(getattr(item, name)) for name, encode, _, _ in _layout(type(item))}
    return {"PartitionKey": getattr(item, key) if key else partition, "RowKey": item.id, **data}


def from_entity[R](cls: type[R], entity: dict[str, Any]) -> R:
    """A record from its table row; a field the row lacks or holds empty takes its default."""
    values: dict[str, Any] = {"id": entity["RowKey"]}
    key = cls._partition_key
    if key:
        values[key] = entity["PartitionKey"]
    for name, _, decode, default in _layout(cls):
        stored = entity.get(name)
        if stored is not None and (stored != "" or default is None):
            values[name] = decode(stored)
        elif default is None:
            raise KeyError(name)  # a row without a required field: not one this app wrote
        else:
            values[name] = default()
    return cls(**values)


class Rows[R]:
    """The records of one kind (a `record` with an `id`) in one partition of a table."""

    def __init__(self, tables: Tables, table: str, partition: str, kind: type[R]) -> None:
        self._tables = tables
        self.table = table
        self.partition = partition
        self.kind = kind

    async def create(self, item: R) -> None:
        """Store a new record; should its random id be taken (64 bits collided), under
        another one."""
        try:
            await self._tables.insert(self.table, to_entity(item, self.partition))
        except Conflict:
            item.id = new_id()
            await self._tables.insert(self.table, to_entity(item, self.partition))

    async def save(self, item: R) -> None:
        await self._tables.upsert(self.table, to_entity(item, self.partition), replace=True)

    async def get(self, ident: str) -> R | None:
        entity = await self._tables.get(self.table, self.partition, ident)
        return None if entity is None else from_entity(self.kind, entity)

    async def list(self) -> list[R]:
        entities = await self._tables.partition(self.table, self.partition)
        return [from_entity(self.kind, e) for e in entities]

    async def delete(self, ident: str) -> None:
        await self._tables.delete(self.table, self.partition, ident)
