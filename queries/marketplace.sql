-- Marketplace (schema/0021_marketplace.sql): listings, reviews, the purchase ledger and
-- payouts. Cross-tenant reads and writes go through the app.marketplace_* functions.

-- name: create_listing :one
-- A listing of an own plugin or workflow template (owners and admins).
INSERT INTO marketplace_listings (org_id, id, kind, plugin_id, workflow_id, title, summary,
                                  categories, pricing, price, currency, status)
VALUES (app.org_id(), :id, :kind, :plugin_id, :workflow_id, :title, :summary, :categories,
        :pricing, :price, :currency, :status)
RETURNING org_id, id, kind, plugin_id, workflow_id, title, summary, categories, pricing,
          price, currency, featured, status, rating_sum, rating_count;

-- name: update_listing :one
UPDATE marketplace_listings SET
  title = coalesce(:title, title), summary = coalesce(:summary, summary),
  categories = coalesce(:categories, categories), pricing = coalesce(:pricing, pricing),
  price = coalesce(:price, price), currency = coalesce(:currency, currency),
  status = coalesce(:status, status)
WHERE org_id = app.org_id() AND id = :id
RETURNING org_id, id, kind, plugin_id, workflow_id, title, summary, categories, pricing,
          price, currency, featured, status, rating_sum, rating_count;

-- name: set_featured :execrows
-- Feature a listing (the platform: dl.system()).
UPDATE marketplace_listings SET featured = :featured WHERE id = :id;

-- name: search :many
SELECT org_id, id, kind, plugin_id, workflow_id, title, summary, categories, pricing, price,
       currency, featured, status, rating_sum, rating_count, rank
FROM app.marketplace_search(:query, :kind, :category, :featured, :after_rank,
                            :after_id::uuid, :limit);

-- name: review :one
-- Write or edit the context user's review (one per user and listing).
SELECT listing_id, user_id, rating, body, created_at, updated_at
FROM app.marketplace_review(:listing_id, :rating, :body);

-- name: reviews :many
SELECT listing_id, user_id, rating, body, created_at, updated_at
FROM app.marketplace_reviews_of(:listing_id, :before_updated_at, :before_user_id, :limit);

-- name: buy :one
SELECT id, listing_id, seller_org_id, kind, amount, currency, refund_of, created_at
FROM app.marketplace_buy(:listing_id);

-- name: refund :one
SELECT id, listing_id, seller_org_id, kind, amount, currency, refund_of, created_at
FROM app.marketplace_refund(:purchase_id);

-- name: ledger :many
-- The context organization's purchases and refunds, newest first.
SELECT id, listing_id, seller_org_id, kind, amount, currency, refund_of, created_at
FROM marketplace_purchases
WHERE org_id = app.org_id()
ORDER BY created_at DESC, id DESC
LIMIT :limit;

-- name: payout_run :scalar
-- Payouts of every seller for [:period_start, :period_end) (dl.system()): purchases minus
-- refunds per currency, the platform keeps :platform_share of the gross minus refunds. One
-- row per (seller, period, currency); a second run inserts nothing. Returns rows inserted.
WITH sums AS (
  SELECT p.seller_org_id AS org_id, p.currency,
         coalesce(sum(p.amount) FILTER (WHERE p.kind = 'purchase'), 0) AS gross,
         coalesce(sum(p.amount) FILTER (WHERE p.kind = 'refund'), 0) AS refunds
  FROM marketplace_purchases p
  WHERE p.created_at >= :period_start::date AND p.created_at < :period_end::date
  GROUP BY 1, 2
), ins AS (
  INSERT INTO marketplace_payouts (org_id, period_start, period_end, currency, gross, refunds,
                                   platform_share, platform_fee, net)
  SELECT s.org_id, :period_start::date, :period_end::date, s.currency, s.gross, s.refunds,
         :platform_share::numeric,
         round((s.gross - s.refunds) * :platform_share::numeric, 2),
         s.gross - s.refunds - round((s.gross - s.refunds) * :platform_share::numeric, 2)
  FROM sums s
  ON CONFLICT (org_id, period_start, period_end, currency) DO NOTHING
  RETURNING 1
)
SELECT count(*) FROM ins;

-- name: payouts :many
SELECT org_id, id, period_start, period_end, currency, gross, refunds, platform_share,
       platform_fee, net, created_at
FROM marketplace_payouts
WHERE org_id = app.org_id()
ORDER BY period_start DESC, currency;
