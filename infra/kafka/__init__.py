"""Config templates of the local Kafka broker: pom.xml, server-template.properties, log4j.properties."""
