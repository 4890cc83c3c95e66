"""The runner: the rules of delivery around the core (flush, retry, dead letters before commits, commit after
the store, revoke, stop), talking to ports that adapters implement."""
