"""The dsexport command line: build, shard, merge, plan, inspect."""
