-- Signatures are looked up by key and time (signatures_by_key_time); no
-- query reads them by agent, and with thousands of agents every insert
-- landed at a random place in this index, costing a WAL page per signature.
DROP INDEX signatures_by_agent;
