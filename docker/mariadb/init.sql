-- The demo schema of docker-compose.mariadb.yml, and the user Debezium's MariaDB connector reads
-- the binlog as (the grants its documentation lists). Demo credentials only.
CREATE TABLE IF NOT EXISTS inv.items (
    id INT PRIMARY KEY,
    name VARCHAR(100) NOT NULL,
    qty INT,
    price DECIMAL(10, 2),
    updated_at DATETIME(6)
);
INSERT INTO inv.items (id, name, qty, price, updated_at) VALUES
    (1, 'anvil', 10, 19.90, NOW(6)),
    (2, 'rope', 250, 4.50, NOW(6));

CREATE USER IF NOT EXISTS 'debezium'@'%' IDENTIFIED BY 'debezium';
GRANT SELECT, RELOAD, SHOW DATABASES, REPLICATION SLAVE, REPLICATION CLIENT, BINLOG MONITOR,
    LOCK TABLES ON *.* TO 'debezium'@'%';
FLUSH PRIVILEGES;
