-- The example's tables: fraiseql captures changes to the table of every @fraiseql.type
-- (Order -> tb_order, Payment -> tb_payment). Run once, on the embedded cluster's first start.
CREATE TABLE tb_order (
    id             text PRIMARY KEY,
    customer_email text NOT NULL,
    status         text NOT NULL DEFAULT 'pending',
    total          numeric(12, 2) NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE tb_payment (
    id           text PRIMARY KEY,
    order_id     text NOT NULL REFERENCES tb_order (id),
    amount       numeric(12, 2) NOT NULL,
    status       text NOT NULL DEFAULT 'pending',
    processed_at timestamptz
);
