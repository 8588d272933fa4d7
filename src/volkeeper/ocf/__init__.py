"""Pacemaker integration: the OCF resource agent ocf:volkeeper:job and its installer."""
