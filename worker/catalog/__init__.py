"""The models a worker serves: the registry (local roots and published versions, loaded generators) and the model
store in object storage (publish, versions, aliases)."""
