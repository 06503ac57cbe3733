-- Demo schema of the compose stack, run once by the postgres image on an empty data directory
-- (mounted into /docker-entrypoint-initdb.d/). Debezium captures public.users and public.orders;
-- streamsync.yaml maps them to user:{id} (hash) and order:{id} (JSON).

create table public.users (
    id serial primary key,
    name text not null,
    email text,
    plan text not null default 'free',
    balance numeric(12,2) not null default 0,
    updated_at timestamptz not null default now()
);

create table public.orders (
    id serial primary key,
    user_id int references public.users,
    total numeric(12,2),
    status text,
    created_at timestamptz default now()
);

insert into public.users (name, email, plan, balance) values
    ('alice', 'alice@example.com', 'pro', 120.50),
    ('bob', 'bob@example.com', 'free', 0),
    ('carol', null, 'team', 1234567.89);

insert into public.orders (user_id, total, status) values
    (1, 19.99, 'paid'),
    (1, 5.00, 'pending'),
    (3, 250.00, 'shipped'),
    (null, null, null);
