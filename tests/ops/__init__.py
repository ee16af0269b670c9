"""Tests of mi_crow.ops (a package so that its module names cannot collide with other test folders)."""
