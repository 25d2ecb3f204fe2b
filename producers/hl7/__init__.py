"""HL7 v2 input from the hospital integration engine: ADT^A01/A04/A08 and ORU^R01.

Messages arrive over MLLP (``crc-medai hl7-listener``) or from files
(``crc-medai produce-hl7``). Each is parsed (:mod:`.parser`), mapped to a FHIR
R4 collection Bundle (:mod:`.mapping`, table in docs/hl7v2-mapping.md), handed
to the record intake and acknowledged (:mod:`.ack`).
"""
