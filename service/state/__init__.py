"""Entity state kept outside the process, shared by serving processes and pods: the Redis store
(docs/state-store.md). May import core/ and the Redis client; nothing else of service/."""
