"""Storage helpers: the asyncpg pool, the Redis client and the SQL migrations runner.

Import the submodules (`quantmesh_common.storage.postgres`, `.redis`, `.migrate`) directly;
this package imports none of them so that using one does not load the others' drivers.
"""
